"""Output safety (issue 13, items 1-3, 13-15) at the level of core.output and the writers:
--overwrite replaces only what Quantscope wrote, the output lock, symbolic links, fsync before
the rename, per-file checksums, a resume journal confined to its folder, and the GGUF file
written once beside its target."""
from __future__ import annotations

import re

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import core.output as output
from core.outlock import OutputBusy, OutputLock, holder_of, lock_path
from core.output import (
    JOURNAL_FILE,
    MANIFEST_FILE,
    REPORT_FILE,
    DamagedOutput,
    OutputWriter,
    check_output,
    find_interrupted,
    foreign_entries,
    partial_dir,
    shard_name,
)


def _write_output(target: Path, source: Path, *, shards: int = 2, overwrite: bool = False, big: bool = False) -> Path:
    with OutputWriter(target, num_shards=shards, overwrite=overwrite) as w:
        for i in range(shards):
            n = (1 << 19) if big else 6  # 2 MiB of float32: the O_DIRECT path where the file system has it
            w.write_shard(i, {f"t{i}.weight": torch.arange(n, dtype=torch.float32) + i})
        return w.finish(config={"architectures": ["LlamaForCausalLM"]}, report={"ok": True}, source=source)


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


# -- 2: --overwrite replaces only what Quantscope wrote --------------------------------------------

def test_overwrite_refuses_a_folder_of_user_files_and_deletes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "Documents"
    (target / "taxes").mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    (target / "taxes" / "2025.pdf").write_bytes(b"%PDF")
    (target / "model-00001-of-00002.safetensors").write_bytes(b"a shard name is not enough")
    before = _tree(target)
    with pytest.raises(ValueError, match=r"holds 3 entries that Quantscope did not write "
                                         r"\(model-00001-of-00002.safetensors, notes.txt, taxes\)") as info:
        _write_output(target, tmp_path, overwrite=True)
    assert "\n" not in str(info.value) and "choose another --out" in str(info.value)
    assert _tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Documents"]  # no temporary folder, no lock


def test_overwrite_replaces_an_empty_folder_and_a_quantscope_output(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    _write_output(target, tmp_path, shards=3, overwrite=True)
    assert (target / shard_name(2, 3)).is_file()
    _write_output(target, tmp_path, shards=2, overwrite=True)
    assert not (target / shard_name(2, 3)).exists() and (target / shard_name(1, 2)).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_file_added_to_a_quantscope_output_makes_it_foreign(tmp_path: Path) -> None:
    target = _write_output(tmp_path / "out", tmp_path)
    assert foreign_entries(target) == []
    (target / "README.md").write_text("my notes on this model")
    with pytest.raises(ValueError, match=r"holds 1 file that Quantscope did not write \(README.md\)"):
        _write_output(target, tmp_path, overwrite=True)
    assert (target / "README.md").read_text() == "my notes on this model"
    assert (target / MANIFEST_FILE).is_file()


def test_an_output_written_before_manifests_is_still_replaceable(tmp_path: Path) -> None:
    target = _write_output(tmp_path / "out", tmp_path)
    (target / MANIFEST_FILE).unlink()  # as Quantscope wrote folders before the manifest existed
    (target / "quantize_config.json").write_text("{}")
    assert foreign_entries(target) == []
    (target / "extra.bin").write_bytes(b"x")
    assert foreign_entries(target) == ["extra.bin"]
    (target / "extra.bin").unlink()
    _write_output(target, tmp_path, overwrite=True)
    assert (target / MANIFEST_FILE).is_file() and not (target / "quantize_config.json").exists()


def test_every_output_carries_a_manifest_with_sizes_and_checksums(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"model": {}}')
    target = _write_output(tmp_path / "out", src, big=True)
    files = json.loads((target / MANIFEST_FILE).read_text())["files"]
    assert sorted(files) == sorted(p.name for p in target.iterdir() if p.name != MANIFEST_FILE)
    for name, entry in files.items():
        assert entry["size"] == (target / name).stat().st_size
        assert entry["crc32"] == output.file_crc32(target / name), name  # O_DIRECT shards included
    check_output(target)


# -- 14: checksums catch a damaged output; fsync before the rename ---------------------------------

def test_a_flipped_byte_in_a_shard_is_named(tmp_path: Path) -> None:
    target = _write_output(tmp_path / "out", tmp_path, big=True)
    shard = target / shard_name(1, 2)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DamagedOutput, match=f"{shard} is damaged: its CRC-32 differs") as info:
        check_output(target)
    assert "\n" not in str(info.value)
    shard.write_bytes(bytes(data[:-4]))
    with pytest.raises(DamagedOutput, match=f"{shard} is damaged: {len(data) - 4} bytes"):
        check_output(target)
    shard.unlink()
    with pytest.raises(DamagedOutput, match=f"{shard} is missing"):
        check_output(target)


def test_every_file_and_the_folders_are_fsynced_around_the_rename(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(a: Any, b: Any) -> None:
        events.append(("rename", str(a)))
        real_rename(a, b)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name file descriptors")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    target = tmp_path / "out"
    _write_output(target, tmp_path)
    tmp = str(partial_dir(target))
    moved = events.index(("rename", tmp))
    synced_before = {Path(p).name.removesuffix(".tmp") for kind, p in events[:moved]
                     if kind == "fsync" and p.startswith(tmp + "/")}  # JSON files: synced, then renamed
    assert synced_before == {p.name for p in target.iterdir()}
    assert ("fsync", tmp) in events[:moved]  # the folder's entries
    assert ("fsync", str(tmp_path)) in events[moved:]  # the rename itself


# -- 3: one job per output at a time ----------------------------------------------------------------

def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    target = tmp_path / "out"
    first = OutputWriter(target, num_shards=1)
    with first:
        first.write_shard(0, {"x": torch.zeros(2)})
        info = json.loads(lock_path(target.absolute()).read_text())
        assert info["pid"] == os.getpid() and "started" in info and info["command"]
        with pytest.raises(OutputBusy, match=rf"in use by another Quantscope run \(pid {os.getpid()}, .*started "):
            OutputWriter(target, num_shards=1).check_target()
        with pytest.raises(OutputBusy):
            with OutputWriter(target, num_shards=1, overwrite=True, resume=True):
                pass
        assert (partial_dir(target) / shard_name(0, 1)).is_file()  # the live job's folder survived
        assert find_interrupted(target) is None  # a running job is not an interrupted one
        first.finish(config={}, report={}, source=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # lock file gone too


def test_two_threads_racing_for_one_output_never_mix(tmp_path: Path) -> None:
    target = tmp_path / "out"
    start = threading.Barrier(2)
    results: list[Any] = []

    def job(value: float) -> None:
        start.wait()
        try:
            with OutputWriter(target, num_shards=4) as w:
                for i in range(4):
                    w.write_shard(i, {f"t{i}": torch.full((1024,), value)})
                    threading.Event().wait(0.2)  # longer than a lock's brief retry
                w.finish(config={}, report={"value": value}, source=tmp_path)
            results.append(value)
        except OutputBusy as exc:
            results.append(exc)

    threads = [threading.Thread(target=job, args=(v,)) for v in (1.0, 2.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [r for r in results if isinstance(r, float)]
    assert len(winners) == 1 and sum(isinstance(r, OutputBusy) for r in results) == 1
    from safetensors.torch import load_file

    for i in range(4):
        assert torch.all(load_file(str(target / shard_name(i, 4)))[f"t{i}"] == winners[0])
    assert json.loads((target / REPORT_FILE).read_text())["value"] == winners[0]


def test_a_dead_holders_lock_file_does_not_block(tmp_path: Path) -> None:
    target = (tmp_path / "out").absolute()
    lock_path(target).write_text('{"pid": 999999, "command": "killed", "started": 0}')  # left by SIGKILL
    assert holder_of(target) is None
    _write_output(target, tmp_path)
    assert not lock_path(target).exists()


def test_a_lock_taken_between_two_looks_is_noticed(tmp_path: Path) -> None:
    target = (tmp_path / "out").absolute()
    lock = OutputLock(target)
    lock.acquire()
    other = OutputLock(target)
    with pytest.raises(OutputBusy):
        other.acquire()
    lock.release()
    other.acquire()  # the file the first holder removed is not the one locked now
    assert lock_path(target).is_file() and holder_of(target) is not None
    other.release()
    assert not lock_path(target).exists() and holder_of(target) is None


def test_remove_partial_leaves_a_live_jobs_folder_alone(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with OutputWriter(target, num_shards=1):
        assert output.remove_partial(target) is False
        assert partial_dir(target).is_dir()
    partial_dir(target).mkdir()  # a killed job's leftover
    assert output.remove_partial(target) is True and list(tmp_path.iterdir()) == []


# -- 13: symbolic links ----------------------------------------------------------------------------

def test_a_symlinked_out_is_refused_and_nothing_is_left_beside_it(tmp_path: Path) -> None:
    real = _write_output(tmp_path / "real", tmp_path)
    link = tmp_path / "link"
    link.symlink_to(real)
    before = _tree(real)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=f"is a symbolic link .*give the real path \\({real}\\)"):
            _write_output(link, tmp_path, overwrite=overwrite)
    assert link.is_symlink() and _tree(real) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .link.old-quantscope


# -- 15: a resume journal names files inside the temporary folder only -----------------------------

def _planted_journal(target: Path, victim: Path, fingerprint: str, **entry: Any) -> None:
    tmp = partial_dir(target)
    tmp.mkdir()
    crc, size = output.file_crc32(victim), victim.stat().st_size
    layer = {"shard": shard_name(0, 2), "file": shard_name(0, 2), "size": size, "crc32": crc, "metrics": []}
    layer.update(entry)
    doc = {"version": 2, "fingerprint": fingerprint, "layers": {"0": layer},
           "calib": {"layer": 0, "file": "../" + victim.name, "size": size, "crc32": crc}}
    (tmp / JOURNAL_FILE).write_text(json.dumps(doc))


@pytest.mark.parametrize("name", ["../victim.safetensors", "/abs/victim.safetensors", "sub/../x", "..", ""])
def test_a_journal_naming_files_outside_its_folder_is_not_trusted(tmp_path: Path, name: str) -> None:
    victim = tmp_path / "victim.safetensors"
    output.write_safetensors(victim, {"x": torch.ones(3)})
    target = tmp_path / "out"
    _planted_journal(target, victim, "fp", file=name, shard=name)
    with OutputWriter(target, num_shards=2, resume=True, fingerprint="fp") as w:
        assert w.fresh_reason and "corrupted" in w.fresh_reason
        assert w.finished_layers() == {} and w.saved_calibration() is None
        s = w.write_shard(1, {"y": torch.zeros(2)})
        w.record_layer(1, [], s, calib={"h": torch.zeros(2)})  # would delete the journal's old calib file
    assert victim.is_file() and output.safetensors_problem(victim) is None


def test_a_journal_calibration_file_outside_the_folder_is_not_trusted(tmp_path: Path) -> None:
    victim = tmp_path / "victim.safetensors"
    output.write_safetensors(victim, {"x": torch.ones(3)})
    target = tmp_path / "out"
    _planted_journal(target, victim, "fp")
    shutil.copy(victim, partial_dir(target) / shard_name(0, 2))  # a genuine-looking shard
    with OutputWriter(target, num_shards=2, resume=True, fingerprint="fp") as w:
        assert w.fresh_reason and "calibration file '../victim.safetensors'" in w.fresh_reason
        s = w.write_shard(1, {"y": torch.zeros(2)})
        w.record_layer(1, [], s, calib={"h": torch.zeros(2)})
    assert victim.is_file()


def test_symlinks_in_or_as_the_temporary_folder_are_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / shard_name(0, 2)
    output.write_safetensors(victim, {"x": torch.ones(3)})
    target = tmp_path / "out"
    _planted_journal(target, victim, "fp")
    doc = json.loads((partial_dir(target) / JOURNAL_FILE).read_text())
    doc.pop("calib")
    (partial_dir(target) / JOURNAL_FILE).write_text(json.dumps(doc))
    (partial_dir(target) / shard_name(0, 2)).symlink_to(victim)
    with OutputWriter(target, num_shards=2, resume=True, fingerprint="fp") as w:
        assert w.fresh_reason and "symbolic link" in w.fresh_reason
    assert victim.is_file()
    partial_dir(target).symlink_to(outside)  # the temporary folder itself a link: only the link goes
    with OutputWriter(target, num_shards=2, resume=True, fingerprint="fp") as w:
        assert w.fresh_reason and "not a folder Quantscope made" in w.fresh_reason
        assert partial_dir(target).is_dir() and not partial_dir(target).is_symlink()
    assert victim.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["outside"]


# -- 1: export writers have the source guard ---------------------------------------------------------

@pytest.fixture(scope="module")
def quantized_parent(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from core.config import QuantJob, RTNConfig
    from core.engine import run_quantization

    parent = tmp_path_factory.mktemp("P")
    run_quantization(QuantJob(model=tiny_llama_dir, out=parent / "q", method=RTNConfig(bits=4, group_size=32)))
    return parent


@pytest.mark.parametrize("where", ["parent", "itself", "inside"])
def test_relayout_never_replaces_or_writes_into_its_source(quantized_parent: Path, where: str) -> None:
    from core.export.convert import relayout

    (quantized_parent / "unrelated.txt").write_text("keep")
    before = _tree(quantized_parent)
    out = {"parent": quantized_parent, "itself": quantized_parent / "q", "inside": quantized_parent / "q" / "g"}[where]
    word = {"parent": "contains", "itself": "is", "inside": "is inside"}[where]
    with pytest.raises(ValueError, match=f"{word} the model folder"):
        relayout(quantized_parent / "q", out, "gptq", overwrite=True)
    assert _tree(quantized_parent) == before


def test_gguf_export_never_writes_into_its_source(quantized_parent: Path) -> None:
    from core.export.gguf import export_gguf

    before = _tree(quantized_parent)
    with pytest.raises(ValueError, match="is inside the model folder"):
        export_gguf(quantized_parent / "q", quantized_parent / "q" / "m.gguf", "Q8_0", overwrite=True)
    assert _tree(quantized_parent) == before


# -- 2, 3, 14, 15 for GGUF ---------------------------------------------------------------------------

def test_gguf_is_written_once_beside_its_target(tiny_llama_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from core.events import Progress
    from core.export.gguf import export_gguf

    spare = tmp_path / "tmpdir"
    spare.mkdir()
    monkeypatch.setenv("TMPDIR", str(spare))
    monkeypatch.setattr(tempfile, "tempdir", str(spare))
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    target = out_dir / "m.gguf"
    seen: list[tuple[bool, bool, int]] = []

    def sink(event: Any) -> None:
        if isinstance(event, Progress):
            partial = out_dir / ".m.gguf.partial-quantscope"
            seen.append((target.exists(), lock_path(target).is_file(), partial.stat().st_size))

    export_gguf(tiny_llama_dir, target, "Q8_0", sink=sink)
    assert seen and not any(exists for exists, _, _ in seen) and all(locked for _, locked, _ in seen)
    sizes = [size for _, _, size in seen]
    assert sizes == sorted(sizes) and sizes[-1] <= target.stat().st_size  # written once, growing in place
    assert list(spare.iterdir()) == []  # nothing staged in $TMPDIR
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.gguf"]
    check_output(target)


def test_gguf_overwrite_replaces_only_a_gguf_quantscope_wrote(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from core.export.gguf import export_gguf

    target = tmp_path / "m.gguf"
    target.write_bytes(b"my own notes, not a GGUF")
    with pytest.raises(ValueError, match="is a file that Quantscope did not write"):
        export_gguf(tiny_llama_dir, target, "Q8_0", overwrite=True)
    assert target.read_bytes() == b"my own notes, not a GGUF"
    target.unlink()
    export_gguf(tiny_llama_dir, target, "F16")
    first = target.read_bytes()
    export_gguf(tiny_llama_dir, target, "Q8_0", overwrite=True)
    assert target.read_bytes() != first
    foreign = tmp_path / "other.gguf"  # a valid GGUF from another tool: no Quantscope mark
    import gguf

    w = gguf.GGUFWriter(str(foreign), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    before = foreign.read_bytes()
    with pytest.raises(ValueError, match="did not write"):
        export_gguf(tiny_llama_dir, foreign, "Q8_0", overwrite=True)
    assert foreign.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "other.gguf"]


def test_concurrent_gguf_exports_one_fails_at_once(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from core.events import Progress
    from core.export.gguf import export_gguf

    target = tmp_path / "m.gguf"
    inside = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    def slow_sink(event: Any) -> None:
        if isinstance(event, Progress):
            inside.set()
            release.wait(30)

    def first() -> None:
        try:
            export_gguf(tiny_llama_dir, target, "Q8_0", sink=slow_sink)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(60)
    with pytest.raises(OutputBusy, match=f"pid {os.getpid()}"):
        export_gguf(tiny_llama_dir, target, "Q4_0", overwrite=True)
    release.set()
    t.join(60)
    assert errors == [] and target.is_file()
    check_output(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("where", ["data", "header"])
def test_a_flipped_byte_in_a_gguf_is_named(tiny_llama_dir: Path, tmp_path: Path, where: str) -> None:
    import gguf

    from core.export.gguf import export_gguf

    target = export_gguf(tiny_llama_dir, tmp_path / "m.gguf", "Q8_0")
    check_output(target)
    data = bytearray(target.read_bytes())
    reader = gguf.GGUFReader(str(target))
    if where == "data":
        at = reader.data_offset + 1000
    else:  # inside a token's text
        field = reader.fields["tokenizer.ggml.tokens"]
        at = field.offset + 100
    data[at] ^= 0x04
    target.write_bytes(bytes(data))
    # A flipped data byte fails the checksum; one in a string's length (header) already fails the
    # structural check, whose line names the file the same way.
    with pytest.raises(DamagedOutput, match=f"{re.escape(str(target))}( is damaged|: .*not a readable GGUF)"):
        check_output(target)
