"""Auditing many checkpoints in one command (`bdclean evaluate DIR`): one row each, bad files as rows
with their exit codes, the documented exit-code rule, JSONL rows, resume, the evaluation cache,
shards + merge against one process, --purify on a folder, and that models are freed."""

from __future__ import annotations

import gc
import json
import os
import pickle
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.errors import ConfigError
from backdoor_cli.models import build_model
from backdoor_cli.reports.audit_log import AuditRow, audit_exit_code, read_rows
from backdoor_cli.usecases import audit as audit_module
from backdoor_cli.usecases.audit_targets import Shard, expand_targets, is_single_target, parse_shard, select_shard
from helpers import make_npz_dataset, train_badnets_model

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Ten checkpoints of four formats and three architectures, one truncated and one unsafe pickle,
    plus a README that a folder audit must not take for a checkpoint."""
    root = tmp_path_factory.mktemp("audit")
    data = make_npz_dataset(root / "data")
    zoo = root / "zoo"
    zoo.mkdir()
    train_badnets_model(data, zoo / "badnets.safetensors", epochs=3)
    from safetensors.torch import load_file

    state = load_file(str(zoo / "badnets.safetensors"))
    torch.save(state, zoo / "badnets-zip.pt")  # torch zip, no metadata: architecture guessed from the keys
    torch.save(state, zoo / "badnets-legacy.pth", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, zoo / "wrapped-ddp.pth")
    torch.manual_seed(1)
    for arch in ("simple_cnn_half", "resnet20"):
        save_file(
            {k: v.contiguous() for k, v in build_model(arch, 3).state_dict().items()}, str(zoo / f"{arch}.safetensors")
        )
    (zoo / "nested").mkdir()
    save_file(
        {k: v.contiguous() for k, v in build_model("test_tiny", 3).state_dict().items()},
        str(zoo / "nested" / "fresh-tiny.safetensors"),
    )
    blob = (zoo / "badnets.safetensors").read_bytes()
    (zoo / "truncated.safetensors").write_bytes(blob[: len(blob) // 2])
    marker = root / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (zoo / "evil.pth").write_bytes(pickle.dumps({"state_dict": Payload()}))
    (zoo / "empty.bin").write_bytes(b"")
    (zoo / "README.md").write_text("not a checkpoint")
    return {"root": root, "data": data, "zoo": zoo, "marker": marker}


BASE = ("--trigger", "badnets", "--device", "cpu", "--quiet")


def audit_json(zoo, *extra):
    result = invoke("evaluate", zoo["zoo"], "--data", zoo["data"], *BASE, "--json", *extra)
    return result, (json.loads(result.stdout) if result.stdout.strip().startswith("{") else None)


def by_name(rows):
    return {Path(r["path"]).name: r for r in rows}


def test_a_folder_of_mixed_checkpoints_is_one_command_with_one_row_each(zoo):
    result, report = audit_json(zoo, "--max-asr", "0.5", "--min-acc", "0.6")
    rows = by_name(report["rows"])
    assert sorted(rows) == sorted(
        [
            "badnets.safetensors",
            "badnets-zip.pt",
            "badnets-legacy.pth",
            "wrapped-ddp.pth",
            "simple_cnn_half.safetensors",
            "resnet20.safetensors",
            "fresh-tiny.safetensors",
            "truncated.safetensors",
            "evil.pth",
            "empty.bin",
        ]
    )
    # the documented rule: the largest row code, and a refused pickle (3) outranks unreadable files (2) and gates (1)
    assert result.exit_code == 3 == report["exit_code"]
    assert rows["evil.pth"]["exit_code"] == 3 and "refused" in rows["evil.pth"]["error"]
    assert not zoo["marker"].exists()
    assert rows["truncated.safetensors"]["exit_code"] == 2 and "truncated" in rows["truncated.safetensors"]["error"]
    assert rows["empty.bin"]["exit_code"] == 2 and rows["empty.bin"]["metrics"] is None
    assert {rows[n]["format"] for n in ("badnets.safetensors", "badnets-zip.pt", "badnets-legacy.pth")} == {
        "safetensors",
        "torch-zip",
        "torch-legacy",
    }
    assert {rows[n]["architecture"] for n in rows if rows[n]["metrics"]} == {"test_tiny", "simple_cnn_half", "resnet20"}
    # the same weights in four formats are the same model on the same images: identical counts
    backdoored = [
        rows[n]["metrics"] for n in ("badnets.safetensors", "badnets-zip.pt", "badnets-legacy.pth", "wrapped-ddp.pth")
    ]
    assert all(m == {**backdoored[0], "seconds": m["seconds"]} for m in backdoored)
    # each measured row's code is its gates' verdict: the trained copies pass, the untrained models fail min-acc
    for row in rows.values():
        if row["metrics"]:
            failed = row["metrics"]["asr"]["value"] > 0.5 or row["metrics"]["clean_acc"]["value"] < 0.6
            assert row["exit_code"] == int(failed) and row["passed"] is (not failed)
    assert rows["badnets.safetensors"]["exit_code"] == 0 and rows["resnet20.safetensors"]["exit_code"] == 1
    # worst first: unmeasured rows, then ASR descending
    order = report["rows"]
    measured = [r for r in order if r["metrics"]]
    assert all(r["metrics"] is None for r in order[: len(order) - len(measured)])
    assert [r["metrics"]["asr"]["value"] for r in measured] == sorted(
        (r["metrics"]["asr"]["value"] for r in measured), reverse=True
    )
    assert all(r["metrics"]["asr"]["ci95"][0] <= r["metrics"]["asr"]["value"] for r in measured)


def test_exit_code_without_unsafe_files_is_the_input_error_then_the_gate(zoo, tmp_path):
    files = [zoo["zoo"] / "badnets.safetensors", zoo["zoo"] / "simple_cnn_half.safetensors"]
    gate = invoke("evaluate", *files, "--data", zoo["data"], *BASE, "--min-acc", "0.6")
    assert gate.exit_code == 1, gate.output
    ok = invoke("evaluate", *files, "--data", zoo["data"], *BASE)
    assert ok.exit_code == 0, ok.output
    bad = invoke(
        "evaluate", *files, zoo["zoo"] / "truncated.safetensors", "--data", zoo["data"], *BASE, "--min-acc", "0.6"
    )
    assert bad.exit_code == 2, bad.output
    assert audit_exit_code([AuditRow("a", "s", "x", 4), AuditRow("b", "s", "x", 3)]) == 4
    assert audit_exit_code([]) == 0


def test_table_and_markdown_name_every_checkpoint_worst_first(zoo):
    result = invoke("evaluate", zoo["zoo"], "--data", zoo["data"], *BASE, "--markdown")
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]  # after the header
    assert len(lines) == 10
    assert "evil.pth" in lines[0] and "refused" in lines[0]  # exit 3 leads
    assert "| nested/fresh-tiny.safetensors | test_tiny |" in result.stdout and "exit code 3" in result.stdout
    assert "README" not in result.stdout and result.exit_code == 3


def test_jsonl_rows_and_resume(zoo, tmp_path):
    jsonl = tmp_path / "audit.jsonl"
    first = invoke("evaluate", zoo["zoo"], "--data", zoo["data"], *BASE, "--jsonl", jsonl)
    assert first.exit_code == 3
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == 10
    row = by_name(rows)["badnets.safetensors"]
    assert row["sha256"] == __import__("hashlib").sha256((zoo["zoo"] / "badnets.safetensors").read_bytes()).hexdigest()
    assert row["architecture"] == "test_tiny" and row["metrics"]["asr"]["ci95"] and row["error"] is None
    assert row["rss_mb"] > 0 and row["settings"]
    # a rerun skips all it holds: no new lines, the same table
    again = invoke("evaluate", zoo["zoo"], "--data", zoo["data"], *BASE, "--jsonl", jsonl, "--markdown")
    assert again.exit_code == 3 and len(jsonl.read_text().splitlines()) == 10
    # a killed run's torn last line is skipped, and a changed setting measures everything again
    with open(jsonl, "a") as handle:
        handle.write('{"schema": "bdclean.audit-row/1", "path": "x", "sha')
    assert len(read_rows(jsonl)) == 10
    changed = invoke("evaluate", zoo["zoo"], "--data", zoo["data"], *BASE, "--jsonl", jsonl, "--eval-limit", "60")
    assert changed.exit_code == 3 and "audit (worst first)" in changed.stdout and "exit code 3" in changed.stdout
    assert len(read_rows(jsonl)) == 20 and all(json.loads(line) for line in jsonl.read_text().splitlines()[-10:])


def test_resume_measures_only_what_is_new(zoo, tmp_path, monkeypatch):
    folder = tmp_path / "some"
    folder.mkdir()
    for name in ("badnets.safetensors", "resnet20.safetensors"):
        shutil.copy(zoo["zoo"] / name, folder / name)
    jsonl = tmp_path / "a.jsonl"
    assert invoke("evaluate", folder, "--data", zoo["data"], *BASE, "--jsonl", jsonl).exit_code == 0
    shutil.copy(zoo["zoo"] / "simple_cnn_half.safetensors", folder / "new.safetensors")
    loaded = []
    real = audit_module.load_subject
    monkeypatch.setattr(audit_module, "load_subject", lambda path, *a, **k: loaded.append(path) or real(path, *a, **k))
    assert invoke("evaluate", folder, "--data", zoo["data"], *BASE, "--jsonl", jsonl).exit_code == 0
    assert [Path(p).name for p in loaded] == ["new.safetensors"]
    assert len(read_rows(jsonl)) == 3


def test_models_are_freed_between_checkpoints(zoo, monkeypatch):
    alive = []
    real = audit_module.load_subject

    def tracking(*args, **kwargs):
        subject = real(*args, **kwargs)
        alive.append(weakref.ref(subject.model))
        return subject

    monkeypatch.setattr(audit_module, "load_subject", tracking)
    seen = []
    from backdoor_cli.config import AuditOptions
    from backdoor_cli.usecases.audit import audit_checkpoints

    opts = AuditOptions(checkpoints=(str(zoo["zoo"]),), data=str(zoo["data"]), trigger="badnets", device="cpu")
    # when a row is reported, the model it measured is already gone
    report = audit_checkpoints(opts, on_row=lambda row: seen.append(sum(ref() is not None for ref in alive)))
    gc.collect()
    assert len(alive) == 7 and seen and max(seen) == 0
    assert len(report.rows) == 10


def test_the_evaluation_cache_serves_a_second_audit_and_purify(zoo, tmp_path):
    cache = tmp_path / "cache"
    model = zoo["zoo"] / "badnets.safetensors"
    first = invoke(
        "evaluate",
        model,
        zoo["zoo"] / "resnet20.safetensors",
        "--data",
        zoo["data"],
        *BASE,
        "--cache-dir",
        cache,
        "--json",
    )
    rows = json.loads(first.stdout)["rows"]
    assert not any(r["cached"] for r in rows) and len(list(cache.glob("*.json"))) == 2
    second = json.loads(
        invoke(
            "evaluate",
            model,
            zoo["zoo"] / "resnet20.safetensors",
            "--data",
            zoo["data"],
            *BASE,
            "--cache-dir",
            cache,
            "--json",
        ).stdout
    )["rows"]
    assert all(r["cached"] for r in second)
    assert [r["metrics"]["asr"] for r in second] == [r["metrics"]["asr"] for r in rows]
    # a different eval limit is a different key
    third = json.loads(
        invoke(
            "evaluate",
            model,
            zoo["zoo"] / "resnet20.safetensors",
            "--data",
            zoo["data"],
            *BASE,
            "--cache-dir",
            cache,
            "--eval-limit",
            "45",
            "--json",
        ).stdout
    )["rows"]
    assert not any(r["cached"] for r in third)
    # single-checkpoint evaluate then purify: purify reads the input's evaluation back
    single = json.loads(invoke("evaluate", model, "--data", zoo["data"], *BASE, "--cache-dir", cache, "--json").stdout)
    purified = runner.invoke(
        app,
        [
            "purify",
            str(model),
            "--data",
            str(zoo["data"]),
            "--out",
            str(tmp_path / "p"),
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--trigger",
            "badnets",
            "--cache-dir",
            str(cache),
            "--json",
        ],
    )
    assert purified.exit_code == 0, purified.output
    assert "read from the evaluation cache" in purified.stderr
    before = json.loads(purified.stdout)["before"]
    assert before == single["metrics"]


def test_purify_on_a_folder_purifies_each_failing_checkpoint_into_its_own_folder(zoo, tmp_path):
    folder = tmp_path / "two"
    (folder / "a").mkdir(parents=True)
    shutil.copy(zoo["zoo"] / "badnets.safetensors", folder / "bd.safetensors")
    shutil.copy(zoo["zoo"] / "nested" / "fresh-tiny.safetensors", folder / "a" / "fresh.safetensors")
    out = tmp_path / "purified"
    result = invoke(
        "evaluate", folder, "--data", zoo["data"], *BASE, "--min-acc", "0.6", "--purify", "ft", "--out", out, "--json"
    )
    report = json.loads(result.stdout)
    rows = by_name(report["rows"])
    failing = [n for n, r in rows.items() if r["exit_code"] == 1]
    assert failing == ["fresh.safetensors"], result.output
    for name, row in rows.items():
        if name in failing:
            assert row["purified"]["error"] is None and Path(row["purified"]["out"]).is_dir()
            assert (Path(row["purified"]["out"]) / "purified.safetensors").is_file()
        else:
            assert row["purified"] is None
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(rows[n]["purified"]["out"]).name for n in failing)
    assert (out / "a__fresh").is_dir() and result.exit_code == 1
    missing_out = invoke("evaluate", folder, "--data", zoo["data"], *BASE, "--purify", "ft")
    assert missing_out.exit_code == 2 and "--out" in missing_out.output


def test_shards_plus_merge_give_the_one_process_table(zoo, tmp_path):
    """Two local shard processes, then `bdclean merge`, against one process on the same folder."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    common = [
        sys.executable,
        "-m",
        "backdoor_cli.cli",
        "evaluate",
        str(zoo["zoo"]),
        "--data",
        str(zoo["data"]),
        *BASE,
        "--min-acc",
        "0.6",
    ]
    procs = [
        subprocess.Popen(
            common + ["--shard", f"{i}/2", "--jsonl", str(tmp_path / f"s{i}.jsonl")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    whole = invoke(*common[3:], "--markdown", "--jsonl", tmp_path / "whole.jsonl")  # meanwhile, one process
    codes = [p.wait(timeout=300) for p in procs]
    shard_rows = [read_rows(tmp_path / f"s{i}.jsonl") for i in range(2)]
    assert sorted(len(r) for r in shard_rows) == [5, 5]
    assert not {r.path for r in shard_rows[0]} & {r.path for r in shard_rows[1]}
    merged = invoke("merge", tmp_path / "s0.jsonl", tmp_path / "s1.jsonl", "--markdown")
    assert whole.exit_code == 3 and merged.exit_code == 3 and max(codes) == 3
    assert merged.stdout == whole.stdout and whole.stdout.count("\n| ") >= 10
    # the rows themselves agree too (all but timings and memory)
    volatile = ("seconds", "rss_mb")

    def comparable(rows):
        return sorted(
            (
                {k: v for k, v in r.to_dict().items() if k not in volatile}
                | {"metrics": r.metrics and {k: v for k, v in r.metrics.items() if k != "seconds"}}
                for r in rows
            ),
            key=lambda r: r["path"],
        )

    assert comparable(shard_rows[0] + shard_rows[1]) == comparable(read_rows(tmp_path / "whole.jsonl"))


def test_merge_refuses_a_corrupt_shard_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        'not json\n{"schema": "bdclean.audit-row/1", "path": "a", "sha256": "s", "settings": "x", "exit_code": 0}\n'
    )
    result = invoke("merge", bad)
    assert result.exit_code == 2 and "bad.jsonl:1" in result.output
    assert invoke("merge", tmp_path / "missing.jsonl").exit_code == 2


def test_targets_shards_and_lists(tmp_path):
    for name in ("b.pt", "a.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"x")
    found = expand_targets([str(tmp_path)])
    assert [Path(p).name for p in found] == ["a.safetensors", "b.pt", "hf"]  # a model directory is one target
    assert expand_targets([str(tmp_path / "*.pt")]) == [str(tmp_path / "b.pt")]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# zoo\n{tmp_path / 'b.pt'}\n\n{tmp_path / 'notes.txt'}\n")
    assert [Path(p).name for p in expand_targets([], str(listing))] == ["b.pt", "notes.txt"]
    assert is_single_target([str(tmp_path / "hf")]) and not is_single_target([str(tmp_path)])
    paths = [f"m{i}" for i in range(7)]
    shares = [select_shard(paths, Shard(i, 3)) for i in range(3)]
    assert sorted(sum(shares, [])) == paths and [len(s) for s in shares] == [3, 2, 2]
    assert parse_shard(None, {"RANK": "1", "WORLD_SIZE": "4"}) == Shard(1, 4)
    assert parse_shard(None, {"WORLD_SIZE": "1"}) is None and parse_shard("2/3", {}) == Shard(2, 3)
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ConfigError):
            parse_shard(bad, {})
    assert invoke("evaluate", str(tmp_path / "nothing-*.pt"), "--data", tmp_path).exit_code == 2
    # --purify folder names: relative to the common folder, unique even when only the suffix differs
    assert audit_module.output_names(["z/a.pt", "z/a.safetensors", "z/sub/b.pt"]) == {
        "z/a.pt": "a.pt",
        "z/a.safetensors": "a.safetensors",
        "z/sub/b.pt": "sub__b",
    }


def test_compare_accepts_a_folder(zoo, tmp_path):
    folder = tmp_path / "cmp"
    folder.mkdir()
    shutil.copy(zoo["zoo"] / "badnets.safetensors", folder / "a.safetensors")
    shutil.copy(zoo["zoo"] / "badnets-zip.pt", folder / "b.pt")
    result = invoke("compare", folder, "--data", zoo["data"], *BASE, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [Path(r["path"]).name for r in rows] == ["a.safetensors", "b.pt"]


def test_from_list_and_the_launcher_rank_pick_the_share(zoo, tmp_path, monkeypatch):
    listing = tmp_path / "list.txt"
    names = ["badnets.safetensors", "simple_cnn_half.safetensors", "truncated.safetensors"]
    listing.write_text("# three of the zoo\n" + "".join(f"{zoo['zoo'] / n}\n" for n in names))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = invoke("evaluate", "--from-list", listing, "--data", zoo["data"], *BASE, "--json")
    rows = json.loads(result.stdout)["rows"]
    # sorted: badnets, simple_cnn_half, truncated -> rank 1 of 2 takes the second only
    assert [Path(r["path"]).name for r in rows] == ["simple_cnn_half.safetensors"] and result.exit_code == 0
    assert json.loads(result.stdout)["shard"] == "1/2"
    explicit = invoke("evaluate", "--from-list", listing, "--data", zoo["data"], *BASE, "--shard", "0/2", "--json")
    assert (
        sorted(Path(r["path"]).name for r in json.loads(explicit.stdout)["rows"])
        == ["badnets.safetensors", "truncated.safetensors"]
        and explicit.exit_code == 2
    )
