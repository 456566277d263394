"""The OmniGen2 trainer: the MLLM and VAE frozen, the diffusion transformer trained (fully or with LoRA).

Runs in one process (CPU or GPU) or under ``accelerate launch`` (DDP; FSDP / DeepSpeed through accelerate's
config). Each optimizer step consumes one global batch of ``batch_size x processes x grad_accum`` samples;
every sample's content, dropout, time and noise are functions of (seed, step, position), and the loss is
normalised by the global element count, so 1 process with batch 2B equals 2 processes with batch B, and a
resumed run continues the uninterrupted loss curve.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from ..errors import CheckpointError, DataError
from ..loading import parse_dtype
from ..models import OmniGen2Transformer2DModel
from ..pipelines import OmniGen2Pipeline
from . import precondition
from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint, truncate_metrics
from .config import TrainConfig
from .data import ImageSpec, MixtureDataset
from .latent_cache import LatentCache
from .lora import config_kwargs, lora_state_dict, peft_config
from .objective import flow_loss, noisy_inputs

logger = logging.getLogger(__name__)

PRECONDITION_TEXTS = 512  # samples whose texts estimate the caption preconditioner


def sample_seed(seed: int, step: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, step, position, 3]).generate_state(1)[0])


class EMA:
    """Exponential moving average of the trained parameters (fp32, on the parameters' device)."""

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.params = named_params
        self.shadow = {k: p.detach().float().clone() for k, p in named_params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - self.decay)


def _tensor_to_pil(image: torch.Tensor):
    """(3, H, W) in [-1, 1] -> an RGB PIL image (a reference given as a tensor, shown to the MLLM)."""
    import PIL.Image

    pixels = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, H, W)
    return PIL.Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())


def lr_lambda(cfg) -> callable:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


class Trainer:
    def __init__(self, cfg: TrainConfig, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg = cfg
        t = cfg.train
        mp = t.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() else "no"
        # Some steps leave modules unused (no reference images: the reference refiner): DDP must allow it.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        # Without CUDA, cpu=True makes a multi-process launch use gloo (MULTI_CPU) instead of one lone process.
        # accelerate runs FSDP on CUDA devices only: say so instead of silently training unsharded copies.
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true") and not torch.cuda.is_available():
            raise RuntimeError(
                "FSDP was requested but no CUDA device is available; on CPU use DDP "
                "(accelerate launch --multi_gpu --num_processes N)"
            )
        self.acc = accelerator or Accelerator(
            mixed_precision=mp, kwargs_handlers=[ddp], cpu=not torch.cuda.is_available()
        )
        device = self.acc.device

        # 1. Frozen components (MLLM, VAE, tokenizer) and the transformer to train
        pipe = OmniGen2Pipeline.from_pretrained(cfg.model.pretrained, torch_dtype=parse_dtype(cfg.model.dtype))
        self.pipe = pipe
        if cfg.model.transformer is not None:
            torch.manual_seed(t.seed)  # a fresh transformer, initialised reproducibly
            spec = cfg.model.transformer
            transformer = (
                OmniGen2Transformer2DModel.from_preset(spec)
                if isinstance(spec, str)
                else OmniGen2Transformer2DModel(**spec)
            )
            pipe.transformer = transformer
        self.transformer = pipe.transformer.float()
        self.transformer.set_attention_backend(cfg.model.attention_backend)
        for m in (pipe.mllm, pipe.vae):
            m.requires_grad_(False).eval().to(device)
        self.transformer.requires_grad_(t.mode == "full")
        if t.mode == "lora":
            self.transformer.add_adapter(
                peft_config(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
            )
        if t.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.token_rows = self._token_rows(t.train_token_embeddings)
        self._chat = None  # OmniGen2ChatPipeline over the same components, for data.chat_images
        if self.token_rows is not None and cfg.data.chat_images:
            raise ValueError(
                "data.chat_images encodes samples through the chat pipeline without gradients; it cannot train "
                "train.train_token_embeddings too"
            )
        self.transformer.train()
        # Indexing refuses the records whose samples would overflow this transformer's position table
        positions = self.transformer.position_table(pipe.vae_scale_factor)
        self.data = MixtureDataset(cfg.data, pipe.tokenizer, seed=t.seed, positions=positions)
        self.out = Path(cfg.output.dir)
        self.preconditioner = self._precondition() if t.precondition_text else None

        # 2. Trained parameters, optimizer, schedule, EMA
        self.named = {k: p for k, p in self.transformer.named_parameters() if p.requires_grad}
        if self.token_rows is not None:
            self.named["mllm.token_rows"] = self.token_param
        if not self.named:
            raise ValueError("nothing to train: no parameter requires gradients")
        self.optimizer = torch.optim.AdamW(
            list(self.named.values()), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, eps=t.eps
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t))
        self.model, self.optimizer = self.acc.prepare(self.transformer, self.optimizer)
        self.ema = EMA(self.named, t.ema_decay) if t.ema_decay > 0 else None

        self.latent_cache = LatentCache(pipe.vae)
        if cfg.data.latent_cache_file:
            n = self.latent_cache.load(cfg.data.latent_cache_file)
            logger.info("latent cache: %d posteriors read from %s", n, cfg.data.latent_cache_file)
        self.step = 0
        self.history: list[dict] = []

    # -- optional: the whitened parameterisation of the caption projection (train.precondition_text) -------

    def _precondition(self) -> torch.Tensor:
        """Attach the caption projection's preconditioner (training/precondition.py): the run's own when it is
        resumed (the statistics of the first model, not of the resumed one), else estimated on the texts of the
        first ``PRECONDITION_TEXTS`` samples of the data (the same positions on every process)."""
        if self.cfg.train.mode != "full":
            raise ValueError("train.precondition_text needs train.mode 'full' (it reparameterises a full weight)")
        A = precondition.load(self.out)
        if A is None:
            b, feats = self.cfg.train.batch_size, []
            for start in range(0, PRECONDITION_TEXTS, b):
                # Step 0's samples at positions 0..N-1: the same texts whatever the batch size and process count
                positions = range(start, min(start + b, PRECONDITION_TEXTS))
                batch = self.data.batch(0, positions, load=False)
                with torch.no_grad():
                    text, mask = self._text(batch)
                feats.append(precondition.caption_inputs(self.transformer, text, mask).cpu())
            A = precondition.inverse_sqrt_moment(torch.cat(feats))
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast

            # The main process's A on every process: each estimates the same one, but a replica that differed in
            # the last bits (non-deterministic kernels) would train a different function under DDP's averaging.
            A = broadcast(A.to(self.acc.device).contiguous(), from_process=0).cpu()
        precondition.attach(self.transformer, A)
        return A

    # -- optional: train embedding rows of new tokens (e.g. <|img|>) in the frozen MLLM -------------------

    def _token_rows(self, tokens: list[str]):
        """Make the MLLM input-embedding rows of ``tokens`` trainable, the rest of the MLLM staying frozen.

        The rows live in their own parameter, spliced into the embedding output by a forward hook: masking
        the gradient of the full matrix would not do, since AdamW's weight decay would still shrink every row."""
        if not tokens:
            return None
        tok = self.pipe.tokenizer
        ids = []
        for token in tokens:
            tid = tok.convert_tokens_to_ids(token)
            if tid is None or tid == tok.unk_token_id:
                raise ValueError(f"train.train_token_embeddings: {token!r} is not a token of the tokenizer")
            ids.append(tid)
        self.embed = self.pipe.mllm.get_input_embeddings()
        self.token_ids = torch.tensor(ids, device=self.embed.weight.device)
        self.token_param = torch.nn.Parameter(self.embed.weight.detach()[self.token_ids].float().clone())

        def splice(module, args, out):
            input_ids = args[0]
            match = input_ids[..., None] == self.token_ids  # (B, L, n)
            if not match.any():
                return out
            rows = (match.to(self.token_param.dtype) @ self.token_param).to(out.dtype)  # (B, L, D)
            return torch.where(match.any(-1, keepdim=True), rows, out)

        self.embed.register_forward_hook(splice)
        return ids

    def embedding_matrix(self) -> torch.Tensor:
        """The MLLM input embeddings with the trained rows written in."""
        weight = self.embed.weight.detach().float().cpu().clone()
        weight[self.token_ids.cpu()] = self.token_param.detach().float().cpu()
        return weight

    # -- one micro-batch -------------------------------------------------------------------------------------

    def _positions(self, micro: int) -> range:
        b, world, rank = self.cfg.train.batch_size, self.acc.num_processes, self.acc.process_index
        base = micro * b * world
        return range(base + rank * b, base + (rank + 1) * b)

    @torch.no_grad()
    def _latents(self, images: list, gens) -> list[torch.Tensor]:
        """Scaled VAE latents of images (tensors or lazy ImageSpecs); the posterior mean, or a sample drawn with
        the sample's generator when ``objective.vae_sample``. Posteriors of files are cached in memory."""
        vae, out = self.pipe.vae, []
        device, dtype = vae.device, vae.dtype  # read once: diffusers walks the parameters on every access
        for img, g in zip(images, gens):
            mean, std = self._posterior(img, device, dtype)
            z = mean
            if self.cfg.objective.vae_sample and g is not None:
                z = mean + std * torch.randn(mean.shape, generator=g)
            out.append(self.pipe._scale_latents(z.to(device, dtype)[None])[0].float())
        return out

    def _posterior(self, img, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of an image's VAE posterior, each (C, h, w) float32 on the CPU; cached for files."""
        key = img.cache_key if isinstance(img, ImageSpec) else None
        hit = self.latent_cache.get(key) if key is not None else None
        if hit is not None:
            return hit
        pixels = img.load() if isinstance(img, ImageSpec) else img
        dist = self.pipe.vae.encode(pixels[None].to(device, dtype)).latent_dist
        # Own storage: dist.mean is a view of the encoder's (2C, h, w) moments, twice the memory per entry
        mean, std = dist.mean[0].float().cpu().clone(), dist.std[0].float().cpu().clone()
        if key is not None and self.cfg.data.cache_latents:
            self.latent_cache.put(key, mean, std)
        return mean, std

    @torch.no_grad()
    def encode_latents(self) -> int:
        """Encode every image of the mix not yet in the latent cache and write ``data.latent_cache_file``
        (``omnigen2 train CONFIG --encode-latents``); returns how many were encoded. Each process encodes a
        share of the images and the main process writes them all."""
        path = self.cfg.data.latent_cache_file
        if not path:
            raise ValueError("--encode-latents needs data.latent_cache_file (where the posteriors are written)")
        if not self.cfg.data.cache_latents:
            raise ValueError("--encode-latents needs data.cache_latents: true")
        vae = self.pipe.vae
        device, dtype = vae.device, vae.dtype
        seen, todo = set(), []
        for spec in self.data.image_specs():
            if spec.cache_key not in seen and spec.cache_key not in self.latent_cache:
                seen.add(spec.cache_key)
                todo.append(spec)
        world, rank = self.acc.num_processes, self.acc.process_index
        mine = todo[rank::world]
        bar = tqdm(mine, desc="encode latents", disable=not self.acc.is_main_process, dynamic_ncols=True)
        for spec in bar:
            self._posterior(spec, device, dtype)
        if world > 1:
            from accelerate.utils import gather_object

            shares = gather_object([[(s.cache_key, *self.latent_cache.get(s.cache_key)) for s in mine]])
            for share in shares:
                for k, m, s in share:
                    self.latent_cache.put(tuple(k), m, s)
        if self.acc.is_main_process:
            self.latent_cache.save(path)
        self.acc.wait_for_everyone()
        return len(todo)

    def _text(self, batch):
        """The MLLM's conditioning of a micro-batch: (B, T, D) float states and their right-padded (B, T) mask.
        Samples flagged ``chat_images`` are encoded as a chat turn that shows the MLLM its input images; the
        others by the instruction alone, as the generation pipeline encodes them."""
        dev = self.acc.device
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        # 1. The states of each sample: the instruction-only samples in one batched pass, the chat ones one by one
        chat = batch.get("chat_images") or [False] * len(ids)
        plain = [i for i, c in enumerate(chat) if not c]
        rows: list[torch.Tensor | None] = [None] * len(ids)  # (T_i, D) each
        if plain:
            ctx = torch.enable_grad() if self.token_rows is not None else torch.no_grad()
            with ctx:
                hidden = self.pipe.mllm(
                    input_ids=ids[plain], attention_mask=mask[plain], output_hidden_states=True, logits_to_keep=1
                ).hidden_states[-1]  # (len(plain), L, D)
            if len(plain) == len(ids):
                return hidden.float(), mask
            for k, i in enumerate(plain):
                rows[i] = hidden[k, : int(mask[i].sum())].float()
        for i in (i for i, c in enumerate(chat) if c):
            images = [r.pil() if isinstance(r, ImageSpec) else _tensor_to_pil(r) for r in batch["refs"][i]]
            rows[i] = self.chat.drawing_conditioning(batch["instructions"][i], images)[0][0].float()  # (T_i, D)
        # 2. Right-pad the rows to one (B, T, D) tensor, the mask marking each row's tokens
        width = max(r.shape[0] for r in rows)
        out = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
        out_mask = torch.zeros(len(rows), width, dtype=mask.dtype, device=dev)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]], out_mask[i, : r.shape[0]] = r, 1
        return out, out_mask

    @property
    def chat(self):
        """The chat pipeline over the frozen components, built on first use (``data.chat_images``)."""
        if self._chat is None:
            from ..pipelines import OmniGen2ChatPipeline

            self._chat = OmniGen2ChatPipeline(self.pipe)
        return self._chat

    def micro_loss(self, batch, step: int, normalizer: float):
        """Loss of one micro-batch, scaled so that summing over micro-batches and averaging over processes
        gives the global mean."""
        cfg = self.cfg
        gens = [torch.Generator().manual_seed(sample_seed(cfg.train.seed, step, p)) for p in batch["positions"]]
        x1 = self._latents(batch["targets"], gens)
        refs = [self._latents(r, [None] * len(r)) or None for r in batch["refs"]]
        xt, t, target = noisy_inputs(
            x1,
            gens,
            self.transformer.config.patch_size,
            cfg.objective.time_sampler,
            cfg.objective.time_shift,
            cfg.objective.shift_factor,
        )
        text, mask = self._text(batch)
        with self.acc.autocast():
            try:
                pred = self.model(xt, t, text, None, mask, refs)
            except ValueError as e:  # a sample indexing could not judge (data.check_images off, chat images)
                raise DataError(f"step {step}: the batch of {', '.join(batch['where'])}: {e}") from e
        plain = flow_loss(pred, target, cfg.objective.loss_reduction)
        # This micro-batch's share of the step's global mean: its own mean times its element (or sample) count
        # over the step's total; DDP averages gradients over processes, hence the factor num_processes.
        count = sum(y.numel() for y in target) if cfg.objective.loss_reduction == "element" else len(target)
        return plain * (count * self.acc.num_processes / normalizer), plain

    def _normalizer(self, batches) -> float:
        """Total element (or sample) count of this optimizer step over all micro-batches and processes."""
        per_elem = self.cfg.objective.loss_reduction == "element"
        patch_tokens = 0.0
        for b in batches:
            for img in b["targets"]:
                c = self.pipe.vae.config.latent_channels
                size = img.size() if isinstance(img, ImageSpec) else img.shape[-2:]
                h, w = (s // self.pipe.vae_scale_factor for s in size)
                patch_tokens += c * h * w if per_elem else 1
        total = torch.tensor([patch_tokens], device=self.acc.device, dtype=torch.float64)
        return float(self.acc.reduce(total, reduction="sum").item())

    # -- the loop --------------------------------------------------------------------------------------------

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        t = self.cfg.train
        batches = [self.data.batch(self.step, self._positions(m), load=False) for m in range(t.grad_accum)]
        normalizer = self._normalizer(batches)
        loss_sum, report = 0.0, []
        for m, batch in enumerate(batches):
            sync = m == len(batches) - 1
            ctx = self.acc.no_sync(self.model) if not sync else torch.enable_grad()
            with ctx:
                scaled, plain = self.micro_loss(batch, self.step, normalizer)
                self.acc.backward(scaled)
            loss_sum += scaled.detach() / self.acc.num_processes
            report.append(plain.detach())
        grad_norm = None
        if t.max_grad_norm > 0:
            grad_norm = self.acc.clip_grad_norm_(list(self.named.values()), t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        loss = float(self.acc.reduce(torch.as_tensor(loss_sum, device=self.acc.device).reshape(1), "sum").item())
        self.step += 1
        rec = {
            "step": self.step,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "samples": t.batch_size * t.grad_accum * self.acc.num_processes,
            "seconds": time.perf_counter() - t0,
        }
        self.history.append(rec)
        return rec

    def trainable_state(self) -> dict[str, torch.Tensor]:
        if self.cfg.train.mode == "lora":
            sd = {k[len("transformer.") :]: v for k, v in lora_state_dict(self.transformer).items()}
        else:
            sd = {k: v.detach().float().cpu() for k, v in self.transformer.state_dict().items()}
            if self.preconditioner is not None:
                sd = precondition.released(sd, self.preconditioner.cpu())
        if self.token_rows is not None:
            sd["mllm.token_rows"] = self.token_param.detach().float().cpu()
        return sd

    def save(self) -> Path | None:
        self.acc.wait_for_everyone()
        path = None
        if self.acc.is_main_process:
            optim = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
            }
            if torch.cuda.is_available():
                optim["rng_cuda"] = torch.cuda.get_rng_state()
            state = {
                "step": self.step,
                "config": self.cfg.to_dict(),
                "mode": self.cfg.train.mode,
                "token_ids": self.token_rows,
                "lora": config_kwargs(self.transformer.peft_config["default"])
                if self.cfg.train.mode == "lora"
                else None,
            }
            ema = {k: v.cpu() for k, v in self.ema.shadow.items()} if self.ema is not None else None
            if ema is not None and self.preconditioner is not None:
                ema = precondition.released(ema, self.preconditioner.cpu())
            path = save_checkpoint(
                self.out, self.step, self.trainable_state(), ema, optim, state, self.cfg.output.keep_last
            )
        self.acc.wait_for_everyone()
        return path

    def resume(self, resume: str | None) -> bool:
        """Restore a checkpoint (``"latest"``, ``"auto"`` or a path; see checkpoint.resolve_resume); False when
        there is none to resume (a new run). Lines of metrics.jsonl past the restored step are dropped."""
        path = resolve_resume(self.out, resume)
        if path is None:
            return False
        ck = load_checkpoint(path)
        if ck["state"]["mode"] != self.cfg.train.mode:
            raise CheckpointError(
                f"{path / 'state.json'}: a train.mode {ck['state']['mode']!r} checkpoint; this run has "
                f"train.mode {self.cfg.train.mode!r}"
            )
        try:
            self._restore(ck)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {str(e)[:500]}") from e
        self.step = ck["state"]["step"]
        if self.acc.is_main_process:
            truncate_metrics(self.out / "metrics.jsonl", self.step)
            logger.info("resumed from %s at step %d", path, self.step)
        return True

    def _restore(self, ck: dict) -> None:
        sd = ck["trainable"]
        rows = sd.pop("mllm.token_rows", None)
        if self.cfg.train.mode == "lora":
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.transformer, sd, adapter_name="default")
        elif self.preconditioner is not None:
            state = self.transformer.state_dict()
            state.update(precondition.parametrized(sd, self.preconditioner.cpu()))
            self.transformer.load_state_dict(state)
        else:
            self.transformer.load_state_dict(sd)
        if rows is not None and self.token_rows is not None:
            with torch.no_grad():
                self.token_param.copy_(rows)
        self.optimizer.load_state_dict(ck["optim"]["optimizer"])
        self.scheduler.load_state_dict(ck["optim"]["scheduler"])
        torch.set_rng_state(ck["optim"]["rng_cpu"])
        if "rng_cuda" in ck["optim"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ck["optim"]["rng_cuda"])
        if self.ema is not None and "ema" in ck:
            shadow = ck["ema"]
            if self.preconditioner is not None:
                shadow = precondition.parametrized(shadow, self.preconditioner)
            if set(shadow) != set(self.ema.shadow):
                raise KeyError(f"ema.safetensors holds {len(shadow)} tensors, this run's EMA {len(self.ema.shadow)}")
            for k, v in shadow.items():
                self.ema.shadow[k].copy_(v)

    def fit(self, resume: str | None = None, max_steps: int | None = None) -> list[dict]:
        """Train to ``train.steps`` (or ``max_steps`` more steps, to stop early on purpose)."""
        cfg = self.cfg
        self.resume(resume)
        main = self.acc.is_main_process
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            if self.preconditioner is not None:
                precondition.save(self.out, self.preconditioner)
            logger.info("%s", self.data.report())
            logger.info(
                "accelerate: %s, %d process(es), mixed precision %s",
                self.acc.distributed_type,
                self.acc.num_processes,
                self.acc.mixed_precision,
            )
        end = cfg.train.steps if max_steps is None else min(cfg.train.steps, self.step + max_steps)
        writer = self._tensorboard() if main and cfg.output.tensorboard else None
        bar = tqdm(total=cfg.train.steps, initial=self.step, disable=not main, desc="train", dynamic_ncols=True)
        log = (self.out / "metrics.jsonl").open("a") if main else None
        try:
            while self.step < end:
                rec = self.train_step()
                if main:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", sps=f"{rec['samples'] / rec['seconds']:.1f}"
                    )
                    if self.step % cfg.output.log_every == 0 or self.step == end:
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                        if writer is not None:
                            writer.add_scalar("loss", rec["loss"], self.step)
                            writer.add_scalar("lr", rec["lr"], self.step)
                if self.step % cfg.output.save_every == 0 or self.step == cfg.train.steps:
                    self.save()
        finally:
            bar.close()
            if log is not None:
                log.close()
            if writer is not None:
                writer.close()
        # The posteriors this run encoded, for the next run on the same images (each process keeps its own;
        # the main process's are written)
        if main and cfg.data.latent_cache_file and len(self.latent_cache) > self.latent_cache.loaded:
            self.latent_cache.save(cfg.data.latent_cache_file)
        return self.history

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("output.tensorboard is on but tensorboard is not installed; metrics.jsonl only")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))
