"""Training data, mixes, configs, run state and checkpoint writes under generated bad input: each case ends in
success or the documented error (DataError, CheckpointError, ValueError) naming the file, line or field, and
leaves no partial file."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path

import PIL.Image
import pytest
import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from omnigen2.errors import CheckpointError, DataError
from omnigen2.images import MAX_IMAGE_PIXELS
from omnigen2.models.transformer_omnigen2 import PositionTable
from omnigen2.training import checkpoint
from omnigen2.training.config import config_from_dict, load_config
from omnigen2.training.data import DataConfig, MixtureDataset, read_jsonl

# Characters str.splitlines splits on that JSON allows (raw) inside strings
SEPARATORS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"


@pytest.fixture(scope="module")
def tokenizer(official_tiny):
    return AutoTokenizer.from_pretrained(official_tiny / "checkpoint" / "processor")


def png(path: Path, size=(32, 32), mode="RGB") -> Path:
    PIL.Image.new(mode, size, "white" if mode == "RGB" else 1).save(path)
    return path


def forged_png(path: Path, w: int, h: int) -> Path:
    """A PNG whose header says w x h, with a sound chunk structure (CRCs right) but no decodable pixels."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"junk") + chunk(b"IEND", b""))
    return path


def record(out="a.png", text="a dot", task="t2i", inputs=None) -> dict:
    return {"task_type": task, "instruction": text, "input_images": inputs, "output_image": out}


def index(folder: Path, lines: list, tokenizer, **cfg) -> MixtureDataset:
    (folder / "d.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return MixtureDataset(DataConfig(path=str(folder / "d.jsonl"), **cfg), tokenizer)


# -- 1. JSON Lines -------------------------------------------------------------------------------------------


line_kinds = st.one_of(
    st.tuples(st.just("good"), st.text(SEPARATORS + 'ab "\\é\r', min_size=1, max_size=12)),
    st.tuples(st.just("blank"), st.sampled_from(["", " ", "\t", "\r"])),
    st.tuples(st.just("junk"), st.sampled_from(["{", "[1,", '{"a": 1', "nul\x00", "\u2028"])),
)


@settings(max_examples=40)
@given(lines=st.lists(line_kinds, min_size=1, max_size=8), crlf=st.booleans(), bom=st.booleans())
def test_jsonl_splits_on_newline_only_and_numbers_lines(lines, crlf, bom):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        png(tmp / "a.png")
        texts, expected_good, expected_bad = [], {}, set()
        for n, (kind, payload) in enumerate(lines, start=1):
            if kind == "good":
                text = "x" + payload  # never blank
                texts.append(json.dumps(record(text=text), ensure_ascii=False))
                expected_good[n] = text
            else:
                texts.append(payload)
                if payload.strip(" \t\r"):  # JSON whitespace only: a lone U+2028 is a bad line, not a blank one
                    expected_bad.add(n)
        data = ("\r\n" if crlf else "\n").join(texts).encode()
        path = tmp / "d.jsonl"
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
        bad = []
        recs = read_jsonl(path, bad)
        assert {int(r.where.rsplit(":", 1)[1]): r.instruction for r in recs} == expected_good
        assert {int(b.where.rsplit(":", 1)[1]) for b in bad} == expected_bad
        assert all(b.where.startswith(f"{path}:") and "invalid JSON" in b.reason for b in bad)


def test_json_array_items_carry_their_line(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "d.json").write_text('[\n  {"task_type": "t2i", "instruction": "x\u2028y", "output_image": "a.png"},\n'
                                     '  {"task_type": "t2i"},\n  7\n]\n')  # fmt: skip
    bad = []
    recs = read_jsonl(tmp_path / "d.json", bad)
    assert [r.where for r in recs] == [f"{tmp_path / 'd.json'}:2"]
    assert [(b.where.rsplit(":", 1)[1], b.kind) for b in bad] == [("3", "missing field"), ("4", "not an object")]
    (tmp_path / "e.json").write_text('[\n {"a": 1},\n {"b": \n]')
    with pytest.raises(DataError, match=r"e\.json:3: not valid JSON"):
        read_jsonl(tmp_path / "e.json", [])


def test_undecodable_bytes_and_deep_nesting_are_reported_per_line(tmp_path, tokenizer):
    png(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_bytes(
        json.dumps(record()).encode() + b"\n\xff\xfe{}\n" + b"[" * 100_000 + b"\n" + json.dumps(record()).encode()
    )
    ds = MixtureDataset(DataConfig(path=str(tmp_path / "d.jsonl")), tokenizer)
    assert [r.where.rsplit(":", 1)[1] for r in ds.sources[0]] == ["1", "4"]
    assert {b.where.rsplit(":", 1)[1]: b.reason for b in ds.bad}.keys() == {"2", "3"}
    assert "not UTF-8" in ds.bad[0].reason and "nested too deeply" in ds.bad[1].reason


# -- 2. Images: everything the trainer would die on is refused while indexing --------------------------------

MODES = [("1", "PNG"), ("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("LA", "PNG"), ("F", "TIFF"),
         ("CMYK", "JPEG"), ("RGB", "JPEG"), ("RGB", "WEBP"), ("RGB", "GIF")]  # fmt: skip
SIDES = st.one_of(st.integers(1, 48), st.sampled_from([15, 16, 17, 2100, 5000]))


@settings(max_examples=40)
@given(
    mode=st.sampled_from(MODES),
    w=SIDES,
    h=SIDES,
    cut=st.one_of(st.none(), st.floats(0, 1)),
    decode=st.booleans(),
    side=st.sampled_from([None, 2048, 64]),
)
def test_random_images_are_refused_when_indexed_or_load_when_drawn(tokenizer, mode, w, h, cut, decode, side):
    """Random modes, sizes (extreme aspect ratios included) and truncations. A record refused names its file
    and line; one accepted with decode_images loads when drawn; without it, drawing either loads it or raises
    DataError naming the record and the file (pixel data is only checked by a full decode)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        buf = io.BytesIO()
        PIL.Image.new(mode[0], (w, h)).save(buf, mode[1])
        data = buf.getvalue()
        if cut is not None:
            data = data[: int(len(data) * cut)]
        img = tmp / "x.img"
        img.write_bytes(data)
        png(tmp / "ok.png")
        cfg = {"decode_images": decode, "max_side_length": side, "max_output_pixels": 4096}
        ds = index(tmp, [record("ok.png"), record("x.img", inputs=["ok.png"], task="edit")], tokenizer, **cfg)
        where = f"{tmp / 'd.jsonl'}:2"
        if ds.bad:
            event(f"refused: {ds.bad[0].kind}")
            assert [b.where for b in ds.bad] == [where] and str(img) in ds.bad[0].reason
            assert len(ds) == 1
            return
        spec = next(s for s in ds.image_specs() if s.path == str(img))
        try:
            pixels = spec.load()
        except DataError as e:
            event("accepted, fails when drawn")
            assert not decode and where in str(e) and str(img) in str(e)
            return
        event("accepted, loads")
        assert pixels.shape[1:] == spec.size() and pixels.shape[1] % 16 == 0 and pixels.shape[2] % 16 == 0
        assert min(w, h) >= 16 and (side is None or max(pixels.shape[1:]) <= side)


@pytest.mark.parametrize("w, h", [(20_000, 20_000), (9000, 9000), (1, 5000), (5000, 1), (16, 5000), (0x7FFFFFFF, 1)])
def test_huge_and_extreme_headers_are_refused_without_decoding(tmp_path, tokenizer, w, h):
    forged_png(tmp_path / "big.png", w, h)
    png(tmp_path / "ok.png")
    ds = index(tmp_path, [record("ok.png"), record("big.png")], tokenizer)
    assert len(ds) == 1 and [b.where for b in ds.bad] == [f"{tmp_path / 'd.jsonl'}:2"]
    kind = "too many pixels" if w * h > MAX_IMAGE_PIXELS else "image size"
    assert ds.bad[0].kind == kind and str(tmp_path / "big.png") in ds.bad[0].reason


def test_a_sound_header_with_corrupt_pixels(tmp_path, tokenizer):
    """Found by decode_images while indexing; without it, the draw names the record and the file."""
    forged_png(tmp_path / "bad.png", 64, 64)
    png(tmp_path / "ok.png")
    lines = [record("ok.png"), record("bad.png")]
    ds = index(tmp_path, lines, tokenizer, decode_images=True)
    assert ds.bad[0].where.endswith("d.jsonl:2") and ds.bad[0].kind == "image unreadable"
    lazy = index(tmp_path, lines, tokenizer)
    assert lazy.bad == [] and len(lazy) == 2
    spec = next(s for s in lazy.image_specs() if s.path.endswith("bad.png"))
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*bad\.png"):
        spec.load()


def test_unchecked_images_fail_when_drawn_naming_the_record(tmp_path, tokenizer):
    png(tmp_path / "thin.png", (1, 5000))
    ds = index(tmp_path, [record("thin.png")], tokenizer, check_images=False)
    spec = next(ds.image_specs())
    for call in (spec.size, spec.load):
        with pytest.raises(DataError, match=r"d\.jsonl:1: image .*thin\.png"):
            call()


def test_samples_beyond_the_position_table_are_refused(tmp_path, tokenizer):
    """With the transformer's RoPE limits: an image wider than the table, and a text plus inputs too long."""
    png(tmp_path / "wide.png", (1024, 16))  # 64 x 1 tokens of 16 pixels
    png(tmp_path / "ok.png", (32, 32))
    (tmp_path / "d.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                record("ok.png"),
                record("wide.png"),
                record("ok.png", text="word " * 200),
                record("ok.png", task="edit", inputs=["ok.png"] * 5),
            ]
        )
    )
    cfg = DataConfig(path=str(tmp_path / "d.jsonl"), max_output_pixels=16384, max_input_pixels=4096)
    short = len(tokenizer(MixtureDataset(cfg, tokenizer).chat("a dot")).input_ids)
    # room for the short text and 5 tokens of inputs on axis 0; 64 rows, 60 columns
    ds = MixtureDataset(cfg, tokenizer, positions=PositionTable((short + 6, 64, 60), 16))
    reasons = {b.where.rsplit(":", 1)[1]: b for b in ds.bad}
    assert len(ds) == 1 and reasons.keys() == {"2", "3", "4"}
    assert "wide.png" in reasons["2"].reason and "axes_lens" in reasons["2"].reason
    assert reasons["3"].kind == reasons["4"].kind == "too long for the model"


def test_no_usable_records_lists_the_reasons(tmp_path, tokenizer):
    (tmp_path / "junk.png").write_bytes(b"")
    lines = [record("missing.png"), record("junk.png"), "{", record("missing.png")]
    with pytest.raises(DataError) as e:
        index(tmp_path, lines, tokenizer)
    msg = str(e.value)
    assert "4 bad records" in msg and "2 image missing" in msg and "1 image unreadable" in msg
    assert "1 invalid JSON" in msg and f"{tmp_path / 'd.jsonl'}:1: image" in msg and "\n" not in msg


# -- 3. Mixes --------------------------------------------------------------------------------------------------

RATIOS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 10**400 // 10**390),
    st.sampled_from([0, 0.0, True, "2", "1e-5", "x", "nan", None, [1]]),
)


def _as_ratio(r) -> float | None:
    """What a mix ratio means (docs/TRAINING.md): a number, or a numeric string read as one; None: refused."""
    if isinstance(r, str):
        try:
            return float(r)
        except ValueError:
            return None
    return float(r) if isinstance(r, (int, float)) and not isinstance(r, bool) else None


@settings(max_examples=40)
@given(ratios=st.lists(RATIOS, min_size=1, max_size=3))
@example(ratios=[1e-05])  # written as 1e-05, which YAML 1.1 reads as a string
@example(ratios=[2.0, 5e-324])  # a share that underflows beside the largest
def test_random_mix_ratios(tokenizer, ratios):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        png(tmp / "a.png")
        entries = []
        for k, r in enumerate(ratios):
            (tmp / f"{k}.jsonl").write_text(json.dumps(record(text=f"source {k}", out="a.png")) + "\n")
            entries.append({"path": f"{k}.jsonl", "ratio": r})
        (tmp / "mix.yml").write_text(json.dumps({"data": entries}))  # JSON is YAML; keeps NaN/inf as floats
        numbers = [_as_ratio(r) for r in ratios]
        valid = all(r is not None and math.isfinite(r) and r >= 0 for r in numbers)
        if not valid or not any(numbers):
            with pytest.raises(DataError, match=r"mix\.yml: (data entry \d \(\d\.jsonl\) has ratio|every ratio is 0)"):
                MixtureDataset(DataConfig(path=str(tmp / "mix.yml"), check_images=False), tokenizer)
            return
        ds = MixtureDataset(DataConfig(path=str(tmp / "mix.yml"), check_images=False), tokenizer)
        # shares relative to the largest ratio; one that underflows to 0 (5e-324 beside 2) is never drawn either way
        expected = [r / max(numbers) for r in numbers if r / max(numbers) > 0]
        assert ds.weights == pytest.approx([e / sum(expected) for e in expected], rel=1e-9)


def test_mix_entries_with_unknown_keys_or_bad_paths(tmp_path, tokenizer):
    (tmp_path / "mix.yml").write_text("data:\n  - {path: a.jsonl, ratoi: 2}\n")
    with pytest.raises(DataError, match=r"data entry 0 \(a\.jsonl\): unknown key\(s\) \['ratoi'\]"):
        MixtureDataset(DataConfig(path=str(tmp_path / "mix.yml")), tokenizer)
    (tmp_path / "mix.yml").write_text("data:\n  - {path: 5}\n")
    with pytest.raises(DataError, match="data entry 0 needs a 'path'"):
        MixtureDataset(DataConfig(path=str(tmp_path / "mix.yml")), tokenizer)


# -- 4. Training config ----------------------------------------------------------------------------------------

FIELDS = ["train.lr", "train.batch_size", "train.steps", "train.betas", "train.ema_decay", "train.seed",
          "data.max_side_length", "data.max_output_pixels", "data.max_input_pixels", "data.prompt_dropout",
          "lora.rank", "lora.target_modules", "output.keep_last", "model.transformer", "data.check_images"]  # fmt: skip
VALUES = st.one_of(
    st.integers(-(10**13), 10**13),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.booleans(),
    st.none(),
    st.lists(st.one_of(st.integers(-5, 5), st.floats(0, 1), st.text(max_size=3)), max_size=3),
)


@settings(max_examples=40)
@given(field=st.sampled_from(FIELDS), value=VALUES)
def test_random_config_values(field, value):
    section, key = field.split(".")
    raw = {"model": {"pretrained": "x"}, section: {key: value}} if section != "model" else None
    raw = raw or {"model": {"pretrained": "x", key: value}}
    try:
        cfg = config_from_dict(raw)
    except ValueError as e:
        assert field in str(e) or field.split(".")[0] + "." in str(e), str(e)
        return
    got = getattr(getattr(cfg, section), key)
    for x in got if isinstance(got, (list, tuple)) else [got]:
        assert not isinstance(x, float) or math.isfinite(x)
    assert cfg.train.lr > 0 and cfg.train.batch_size >= 1 and cfg.output.keep_last >= 1
    assert cfg.data.max_side_length is None or cfg.data.max_side_length <= 32768
    assert 1 <= cfg.data.max_output_pixels <= MAX_IMAGE_PIXELS


def test_config_errors_name_the_file(tmp_path):
    (tmp_path / "c.yml").write_text("model: {pretrained: x}\ntrain: {lr: .nan}\n")
    with pytest.raises(ValueError, match=r"c\.yml: train\.lr must be a finite number, got nan"):
        load_config(tmp_path / "c.yml")
    (tmp_path / "c.yml").write_text("- a list\n")
    with pytest.raises(ValueError, match=r"c\.yml: a training config must be a mapping"):
        load_config(tmp_path / "c.yml")
    (tmp_path / "c.yml").write_text("model: {pretrained: x}\ndata: {max_side_length: 1000000}\n")
    with pytest.raises(ValueError, match=r"c\.yml: data\.max_side_length must be null or in"):
        load_config(tmp_path / "c.yml")
    cfg = load_config(tmp_path / "c.yml", ["data.max_side_length=2048", "train.steps=1000000000000"])
    assert cfg.train.steps == 10**12  # long runs are fine; sizes are what allocates


# -- 5. Checkpoints: corrupt state, failed writes, resume ------------------------------------------------------


def save(out: Path, step: int, keep_last: int = 3) -> Path:
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    optim = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng_cpu": torch.get_rng_state()}
    state = {"step": step, "config": {"model": {"pretrained": "x", "dtype": "fp32"}}, "mode": "full",
             "token_ids": None, "lora": None}  # fmt: skip
    return checkpoint.save_checkpoint(out, step, {"w": w}, {"w": w * 2}, optim, state, keep_last)


JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 10**20), st.floats(), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6,
)


@settings(max_examples=40)
@given(
    damage=st.one_of(
        st.tuples(st.just("bytes"), st.binary(max_size=40)),
        st.tuples(st.just("cut"), st.floats(0, 1)),
        st.tuples(st.just("drop"), st.sampled_from(["step", "config", "mode", "token_ids", "lora"])),
        st.tuples(st.just("set"), st.tuples(st.sampled_from(["step", "config", "mode", "token_ids", "lora"]), JSON)),
    )
)
def test_random_corrupt_state_json(damage):
    with tempfile.TemporaryDirectory() as tmp:
        ck = save(Path(tmp), 2)
        path = ck / "state.json"
        state, (kind, arg) = json.loads(path.read_text()), damage
        if kind == "bytes":
            path.write_bytes(arg)
        elif kind == "cut":
            path.write_text(path.read_text()[: int(len(path.read_text()) * arg)])
        elif kind == "drop":
            del state[arg]
            path.write_text(json.dumps(state))
        else:
            state[arg[0]] = arg[1]
            path.write_text(json.dumps(state))
        try:
            loaded = checkpoint.load_checkpoint(ck)
        except CheckpointError as e:
            event("refused")
            assert str(path) in str(e)
            return
        event("loaded")
        s = loaded["state"]  # what loaded is what the trainer and export rely on
        assert s["step"] == 2 and s["mode"] in ("full", "lora") and isinstance(s["config"]["model"]["pretrained"], str)
        assert torch.equal(loaded["trainable"]["w"], torch.ones(3))


def test_corrupt_weights_and_optimizer_files_are_named(tmp_path):
    for name in ("trainable.safetensors", "optimizer.pt", "ema.safetensors"):
        ck = save(tmp_path / name, 1)
        (ck / name).write_bytes((ck / name).read_bytes()[:50])
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            checkpoint.load_checkpoint(ck)


def test_resume_latest_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*checkpoints; to start a new run leave out --resume"):
        checkpoint.resolve_resume(tmp_path / "run", "latest")
    assert checkpoint.resolve_resume(tmp_path / "run", "auto") is None
    assert checkpoint.resolve_resume(tmp_path / "run", None) is None
    ck = save(tmp_path / "run", 4)
    assert checkpoint.resolve_resume(tmp_path / "run", "latest") == ck == checkpoint.resolve_resume(tmp_path, str(ck))
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        checkpoint.resolve_resume(tmp_path / "run", str(tmp_path))


@settings(max_examples=25)
@given(
    fail_at=st.integers(0, 3),
    partial=st.integers(0, 64),
    code=st.sampled_from([errno.ENOSPC, errno.EIO, errno.EDQUOT]),
    existing=st.booleans(),
)
def test_a_failed_checkpoint_write_leaves_no_partial_checkpoint(fail_at, partial, code, existing):
    """The k-th file of the checkpoint fails part way (a disk that fills); the previous checkpoint stays latest."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        first = save(out, 1)
        if existing:  # the same step written again (a resumed run): the old copy must survive the failure
            save(out, 2)
        writes, real_save_file, real_torch_save, real_write_text = (
            [0],
            checkpoint.save_file,
            torch.save,
            Path.write_text,
        )

        def failing(real):
            def write(*args, **kwargs):
                if writes[0] == fail_at:
                    target = next(a for a in args if isinstance(a, (str, Path)) and "tmp-step" in str(a))
                    Path(target).write_bytes(os.urandom(partial))
                    raise OSError(code, os.strerror(code), str(target))
                writes[0] += 1
                return real(*args, **kwargs)

            return write

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(checkpoint, "save_file", failing(real_save_file))
            mp.setattr(torch, "save", failing(real_torch_save))
            mp.setattr(Path, "write_text", failing(lambda p, *a, **k: real_write_text(p, *a, **k)))
            with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-0000002: .*nothing of it"):
                save(out, 2)
        root = out / checkpoint.CKPT_DIR
        assert sorted(p.name for p in root.iterdir()) == ["step-0000001", "step-0000002"][: 1 + existing]
        latest = checkpoint.resolve_resume(out, "latest")
        assert latest == (root / "step-0000002" if existing else first)
        checkpoint.load_checkpoint(latest)  # whole


@settings(max_examples=30)
@given(
    steps=st.lists(st.integers(1, 9), max_size=8),
    torn=st.booleans(),
    resume_at=st.integers(0, 9),
)
def test_resume_drops_metrics_past_the_step(steps, torn, resume_at):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.jsonl"
        text = "".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in steps)
        path.write_text(text + ('{"step": 9, "lo' if torn else ""))
        checkpoint.truncate_metrics(path, resume_at)
        kept = [json.loads(line) for line in path.read_text().splitlines()]
        assert kept == [{"step": s, "loss": s / 10} for s in steps if s <= resume_at]
        assert os.listdir(tmp) == ["metrics.jsonl"]


def test_the_trainer_refuses_at_indexing_what_its_model_would_fail_on(official_tiny, tmp_path):
    """A transformer whose position table holds 64 columns: a 640 x 16 target (80 columns of 8-pixel tokens)
    is left out while indexing; with the checks off the same record stops the run when drawn, naming it."""
    from omnigen2.training import Trainer

    spec = json.loads((official_tiny / "checkpoint" / "transformer" / "config.json").read_text())
    spec = {k: v for k, v in spec.items() if not k.startswith("_")} | {"axes_lens": [2048, 64, 64]}
    png(tmp_path / "ok.png")
    png(tmp_path / "wide.png", (640, 16))
    (tmp_path / "d.jsonl").write_text(json.dumps(record("ok.png")) + "\n" + json.dumps(record("wide.png")) + "\n")
    (tmp_path / "wide.jsonl").write_text(json.dumps(record("wide.png")) + "\n")

    def trainer(path: str, **data) -> Trainer:
        raw = {
            "model": {"pretrained": str(official_tiny / "checkpoint"), "transformer": spec},
            "data": {"path": str(tmp_path / path), "max_output_pixels": 16384, "max_side_length": None, **data},
            "train": {"steps": 1, "batch_size": 1},
            "output": {"dir": str(tmp_path / "run")},
        }
        return Trainer(config_from_dict(raw))

    checked = trainer("d.jsonl")
    assert [b.where for b in checked.data.bad] == [f"{tmp_path / 'd.jsonl'}:2"]
    assert "80x2 tokens" in checked.data.bad[0].reason and "axes_lens" in checked.data.bad[0].reason
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        checked.fit(resume="latest")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    unchecked = trainer("wide.jsonl", check_images=False)
    with pytest.raises(DataError, match=r"wide\.jsonl:1: RoPE position \d+ on axis 2"):
        unchecked.train_step()


@settings(max_examples=15)
@given(cut=st.floats(0, 0.99))
def test_a_truncated_latent_cache_file_is_named(cut):
    from omnigen2.training.latent_cache import LatentCache

    with tempfile.TemporaryDirectory() as tmp:
        cache, path = LatentCache(vae=None), Path(tmp) / "latents.safetensors"
        cache._fingerprint = "f"  # no VAE needed: the file is refused before its fingerprint is compared
        cache.put(("a.png", 4096, None), torch.zeros(4, 2, 2), torch.ones(4, 2, 2))
        cache.save(path)
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * cut)])
        with pytest.raises(DataError, match=r"latent_cache_file .*latents\.safetensors' is corrupt"):
            LatentCache(vae=None).load(path)
        assert os.listdir(tmp) == ["latents.safetensors"]
