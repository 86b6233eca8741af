"""The scan cache (scanning/cache.py): a second scan of the same model, images and settings is read back, equal to
the search it replaces; anything it depends on changes the key; a damaged entry is a miss; and through the CLI a
second `purify --cache-dir` skips the search and writes the first run's weights bit for bit."""

from __future__ import annotations

import json
import os

import pytest
import torch

from backdoor_cli.data.datasets import ImageSet
from backdoor_cli.models.output_kind import LossAdapter
from backdoor_cli.progress import Reporter
from backdoor_cli.scanning import cache as scan_cache
from backdoor_cli.scanning.cache import ScanCache, open_scan_cache, scan_key
from backdoor_cli.scanning.guided import run_scan
from backdoor_cli.scanning.inversion import InversionParams
from helpers import MEAN, STD, Tiny, tiny_data

PARAMS = InversionParams(steps=12, batch_size=8, patience=4)


def _model():
    torch.manual_seed(0)
    return Tiny(3).eval()


def _scan(model, cache, params=PARAMS, seed=0, reporter=None):
    return run_scan(
        model, tiny_data(), 3, MEAN, STD, LossAdapter(), params, seed, reporter or Reporter(), "fp32", cache
    )


class Said(Reporter):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)


def _same_triggers(a, b) -> bool:
    return all(
        torch.equal(x.mask, y.mask) and torch.equal(x.pattern, y.pattern) and x.l1 == y.l1 and x.steps == y.steps
        for x, y in zip(a.triggers, b.triggers, strict=True)
    )


def test_a_second_scan_is_read_back_equal_to_the_search(tmp_path):
    cache = ScanCache(tmp_path)
    first = _scan(_model(), cache)
    assert first.cached is None
    assert len(list(tmp_path.glob("*.json"))) == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1
    said = Said()
    again = _scan(_model(), cache, reporter=said)
    assert again.cached is not None and any("read from the scan cache" in line for line in said.lines)
    assert _same_triggers(first, again)
    assert again.anomaly == first.anomaly and again.flagged == first.flagged and again.median_l1 == first.median_l1
    # and a search run again without the cache gives the same: the entry is what the search gives
    assert _same_triggers(_scan(_model(), None), again)


def test_the_key_follows_everything_the_scan_depends_on():
    images = tiny_data()

    def key(model=None, x=images.x, seed=0, params=PARAMS, adapter=None, mean=MEAN):
        shown = ImageSet(x, images.y)
        return scan_key(model or _model(), shown, 3, mean, STD, adapter or LossAdapter(), params, seed, "fp32").digest

    base = key()
    assert key() == base  # the same inputs, the same key
    nudged = _model()
    with torch.no_grad():
        nudged.conv.weight[0, 0, 0, 0] += 1e-6
    stats = _model()
    stats.bn.running_mean += 1e-3  # a buffer, not a parameter
    other_images = images.x.clone()
    other_images[0, 0, 0, 0] ^= 1
    changed = [
        key(model=nudged),
        key(model=stats),
        key(model=_model().to(memory_format=torch.channels_last)),  # the two formats round differently
        key(x=other_images),
        key(seed=1),
        key(params=InversionParams(steps=13, batch_size=8, patience=4)),
        key(adapter=LossAdapter(kind="probs", source="log-of-output")),
        key(mean=MEAN + 0.01),
    ]
    assert base not in changed and len(set(changed)) == len(changed)
    fields = scan_key(_model(), images, 3, MEAN, STD, LossAdapter(), PARAMS, 0, "fp32").fields
    assert {"torch", "bdclean", "processor", "threads", "precision"} <= set(fields)
    assert fields["processor"].startswith("cpu:") and scan_cache.cpu_model()  # the CPU's model, not only its level


def test_the_cpu_model_is_read_from_cpuinfo_or_the_platform(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14 96-Core Processor\nflags\t: avx512f\n")
    assert scan_cache.cpu_model(info) == "AMD EPYC 9R14 96-Core Processor"
    assert scan_cache.cpu_model(tmp_path / "absent")  # no /proc: the platform's word


def _entry(tmp_path):
    cache = ScanCache(tmp_path)
    _scan(_model(), cache)
    (record,) = tmp_path.glob("*.json")
    return cache, record, record.with_suffix(".safetensors")


def _rewrite_record(path, change):
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def _rewrite_tensors(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "damage",
    [
        "truncated tensors",
        "no tensors",
        "a mask's size edited",
        "a mask out of range",
        "a pattern reshaped",
        "another schema",
        "another key",
        "not json",
        "a record that is not a regular file",
        "a record too large",
    ],
)
def test_a_damaged_entry_is_a_miss_and_is_searched_and_written_again(tmp_path, damage, monkeypatch):
    cache, record, tensors = _entry(tmp_path)
    if damage == "truncated tensors":
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif damage == "no tensors":
        tensors.unlink()
    elif damage == "a mask's size edited":
        _rewrite_record(record, lambda r: r["classes"][1].update(l1=r["classes"][1]["l1"] * 0.5))
    elif damage == "a mask out of range":
        _rewrite_tensors(tensors, lambda t: t["masks"].__setitem__((0, 0, 0), 2.0))
    elif damage == "a pattern reshaped":
        _rewrite_tensors(tensors, lambda t: t.__setitem__("patterns", t["patterns"][:, :4].contiguous()))
    elif damage == "another schema":
        _rewrite_record(record, lambda r: r.update(schema="bdclean.scan-cache/0"))
    elif damage == "another key":
        _rewrite_record(record, lambda r: r["key"].update(seed=5))
    elif damage == "a record that is not a regular file":
        record.unlink()
        os.mkfifo(record)  # a read would block forever: never opened
    elif damage == "a record too large":
        monkeypatch.setattr(scan_cache, "MAX_RECORD_BYTES", 10)
    else:
        record.write_text("{not json")
    said = Said()
    result = _scan(_model(), cache, reporter=said)
    assert result.cached is None and not any("read from the scan cache" in line for line in said.lines)
    monkeypatch.undo()
    assert _scan(_model(), cache).cached is not None  # the search wrote a good entry again


def test_an_entry_too_large_is_not_kept_and_the_run_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(scan_cache, "MAX_ENTRY_BYTES", 100)
    said = Said()
    result = _scan(_model(), ScanCache(tmp_path), reporter=said)
    assert result.cached is None and not list(tmp_path.iterdir())
    assert any("not kept in the scan cache" in line for line in said.lines)


def test_the_scan_cache_is_off_without_a_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("BDCLEAN_CACHE_DIR", raising=False)
    assert open_scan_cache(None) is None
    monkeypatch.setenv("BDCLEAN_CACHE_DIR", str(tmp_path))
    assert open_scan_cache(None).root == tmp_path / "scan"
    assert open_scan_cache(tmp_path / "mine").root == tmp_path / "mine" / "scan"


# --- through the CLI: the planted toy (conftest.py), purified twice with the same --cache-dir ---


def _purify(planted, out, cache_dir):
    from typer.testing import CliRunner

    from backdoor_cli.cli import app

    args = ["purify", str(planted["model"]), "--data", str(planted["data"]), "--out", str(out), "--clean-count", "400"]
    args += ["--epochs", "2", "--device", "cpu", "--json", "--seed", "3"]
    result = CliRunner().invoke(app, args + (["--cache-dir", str(cache_dir)] if cache_dir else []))
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout), result


def test_a_second_purify_reads_the_scan_back_and_writes_the_same_weights(planted_template, tmp_path, monkeypatch):
    monkeypatch.delenv("BDCLEAN_CACHE_DIR", raising=False)
    from backdoor_cli.checkpoint import read_checkpoint

    first, _ = _purify(planted_template, tmp_path / "first", tmp_path / "cache")
    assert first["scan"]["cached"] is None and 0 in first["scan"]["flagged"]
    assert len(list((tmp_path / "cache" / "scan").glob("*.safetensors"))) == 1
    second, result = _purify(planted_template, tmp_path / "second", tmp_path / "cache")
    entry = second["scan"]["cached"]
    assert entry and (tmp_path / "cache" / "scan" / f"{entry}.json").is_file()
    assert "read from the scan cache" in " ".join(result.stderr.split())
    assert (
        second["scan"]["classes"] == first["scan"]["classes"] and second["scan"]["flagged"] == first["scan"]["flagged"]
    )
    assert second["removal"]["verdict"] == first["removal"]["verdict"]
    assert all(second["after"][m] == first["after"][m] for m in ("clean_acc", "asr_no_trigger"))
    a = read_checkpoint(str(tmp_path / "first" / "purified.safetensors")).state_dict
    b = read_checkpoint(str(tmp_path / "second" / "purified.safetensors")).state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "scan" in second["timings"] and second["timings"]["scan"] < first["timings"]["scan"]


def test_without_a_cache_folder_purify_keeps_no_scan(planted_template, tmp_path, monkeypatch):
    monkeypatch.delenv("BDCLEAN_CACHE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    report, _ = _purify(planted_template, tmp_path / "out", None)
    assert report["scan"]["cached"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bdclean_scan_reads_a_scan_back_with_cache_dir(planted_template, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from backdoor_cli.cli import app

    args = ["scan", str(planted_template["model"]), "--data", str(planted_template["data"]), "--clean-count", "200"]
    args += ["--steps", "30", "--device", "cpu", "--json", "--cache-dir", str(tmp_path / "cache")]
    monkeypatch.delenv("BDCLEAN_CACHE_DIR", raising=False)
    monkeypatch.setattr(scan_cache, "CACHE_HINT_SECONDS", 0.0)
    bare = CliRunner().invoke(app, args[:-2])  # no cache: a long scan says how to keep it
    first = CliRunner().invoke(app, args)
    second = CliRunner().invoke(app, args)
    assert bare.exit_code == 0 and "with --cache-dir DIR" in " ".join(bare.stderr.split())
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["cached"] is None and b["cached"] and (tmp_path / "cache" / "scan" / f"{b['cached']}.json").is_file()
    assert b["classes"] == a["classes"] and b["flagged_classes"] == a["flagged_classes"]
    assert "read from the scan cache" in " ".join(second.stderr.split())


def test_a_long_scan_that_nothing_kept_says_how_to_keep_it(planted_template, tmp_path, monkeypatch):
    monkeypatch.delenv("BDCLEAN_CACHE_DIR", raising=False)
    monkeypatch.setattr(scan_cache, "CACHE_HINT_SECONDS", 0.0)  # every scan is "long"
    _, plain = _purify(planted_template, tmp_path / "plain", None)
    assert "with --cache-dir DIR (or BDCLEAN_CACHE_DIR) it is kept" in " ".join(plain.stderr.split())
    _, kept = _purify(planted_template, tmp_path / "kept", tmp_path / "cache")
    assert "--cache-dir DIR" not in " ".join(kept.stderr.split())  # it is kept already: nothing to say
    assert scan_cache.keep_scan_hint(-1.0) is None  # and a short scan is not worth a word
