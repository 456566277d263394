"""data.latent_cache_file: VAE posteriors encoded once, written to safetensors, read by the next run on the
same images and VAE; refused for another VAE."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open

from omnigen2.training import Trainer, config_from_dict
from omnigen2.training.latent_cache import LatentCache


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_encode_latents_writes_every_image_of_the_mix(base_config, four_samples, tmp_path):
    from omnigen2.cli import main

    cache = tmp_path / "latents.safetensors"
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(base_config(data={"latent_cache_file": str(cache)})))
    assert main(["train", str(tmp_path / "cfg.yml"), "--encode-latents"]) == 0
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # encoded only, nothing trained

    # Four image files, each with the same resize rule as input and as output: four posteriors
    trainer = Trainer(config_from_dict(base_config(data={"latent_cache_file": str(cache)})))
    assert trainer.latent_cache.loaded == 4
    vae = trainer.pipe.vae
    for spec in trainer.data.image_specs():
        mean, std = trainer.latent_cache.get(spec.cache_key)
        with torch.no_grad():
            dist = vae.encode(spec.load()[None]).latent_dist
        assert torch.equal(mean, dist.mean[0].float()) and torch.equal(std, dist.std[0].float())
    with safe_open(str(cache), framework="pt") as f:
        assert [k for k in f.keys() if k.startswith("mean.")] == ["mean.0"]  # one block
        assert f.get_slice("mean.0").get_shape() == [4, 4, 16, 16]  # (N, C, h, w)


def test_a_run_reads_the_file_and_trains_the_same(base_config, tmp_path, monkeypatch):
    cache = tmp_path / "latents.safetensors"
    raw = base_config(train={"steps": 3, "batch_size": 2}, data={"prompt_dropout": 0.3, "ref_image_dropout": 0.5})
    plain = Trainer(config_from_dict(raw, [f"output.dir={tmp_path / 'plain'}"]))
    plain.fit()

    first = Trainer(config_from_dict(raw, [f"output.dir={tmp_path / 'a'}", f"data.latent_cache_file={cache}"]))
    first.fit()  # writes the posteriors it encoded when the run ends
    assert cache.is_file() and first.latent_cache.loaded == 0

    second = Trainer(config_from_dict(raw, [f"output.dir={tmp_path / 'b'}", f"data.latent_cache_file={cache}"]))
    assert second.latent_cache.loaded == len(first.latent_cache) > 0

    def no_encoding(*args, **kwargs):
        raise AssertionError("the VAE encoder ran although every posterior was in the cache file")

    monkeypatch.setattr(second.pipe.vae, "encode", no_encoding)
    second.fit()
    assert _losses(tmp_path / "plain") == _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_blocks_of_several_shapes_round_trip(base_config, tmp_path, monkeypatch):
    from omnigen2.training import latent_cache

    monkeypatch.setattr(latent_cache, "COMPACT_EVERY", 3)  # several blocks from seven entries
    trainer = Trainer(config_from_dict(base_config()))
    cache, g = trainer.latent_cache, torch.Generator().manual_seed(0)
    entries = {}
    for i in range(7):
        shape = (4, 8, 8) if i % 2 else (4, 16, 12)
        entries[(f"{i}.png", 4096, None if i == 3 else 2048)] = (torch.randn(shape, generator=g), torch.rand(shape))
    for k, (m, s) in entries.items():
        cache.put(k, m, s)
    cache.put(("0.png", 4096, 2048), torch.zeros(4, 16, 12), torch.zeros(4, 16, 12))  # known: the first is kept
    assert len(cache.blocks) == 4  # two compactions of three, each two shapes; the seventh still loose
    cache.save(tmp_path / "c.safetensors")

    again = LatentCache(trainer.pipe.vae)
    assert again.load(tmp_path / "c.safetensors") == 7 and again.loaded == 7
    for k, (m, s) in entries.items():
        got = again.get(k)
        assert torch.equal(got[0], m) and torch.equal(got[1], s), k
    assert again.load(tmp_path / "c.safetensors") == 0  # nothing new the second time


def test_a_file_of_another_vae_is_refused(base_config, tmp_path):
    cache = tmp_path / "latents.safetensors"
    trainer = Trainer(config_from_dict(base_config()))
    trainer.latent_cache.put(("x.png", 4096, 2048), torch.zeros(4, 8, 8), torch.ones(4, 8, 8))
    trainer.latent_cache.save(cache)

    other_vae = trainer.pipe.vae
    with torch.no_grad():
        next(other_vae.parameters()).add_(1e-3)  # a fine-tuned VAE: its latents mean something else
    with pytest.raises(ValueError, match="another VAE") as e:
        LatentCache(other_vae).load(cache)
    assert str(cache) in str(e.value)


def test_the_fingerprint_follows_the_weights_not_the_folder(base_config, tmp_path):
    from diffusers import AutoencoderKL

    from omnigen2.training.latent_cache import vae_fingerprint

    vae = Trainer(config_from_dict(base_config())).pipe.vae
    vae.save_pretrained(tmp_path / "a")
    vae.save_pretrained(tmp_path / "b")  # a pipeline exported by the next phase carries the same VAE
    a, b = (AutoencoderKL.from_pretrained(tmp_path / d) for d in "ab")
    assert a.config._name_or_path != b.config._name_or_path
    assert vae_fingerprint(a) == vae_fingerprint(b) == vae_fingerprint(vae)


def test_encode_latents_needs_a_file(base_config):
    trainer = Trainer(config_from_dict(base_config()))
    with pytest.raises(ValueError, match="data.latent_cache_file"):
        trainer.encode_latents()
