"""One run per output: the lock that keeps two runs from writing one output or resume folder."""
import json
import logging
import subprocess
import sys
import textwrap

import pytest

import compquant
from compquant import QuantConfig
from compquant.cli import main
from compquant.core.lock import OutputLockedError, exclusive, lock_file

HOLDER = textwrap.dedent("""
    import sys, time
    from compquant.core.lock import exclusive
    with exclusive(sys.argv[1]):
        print("holding", flush=True)
        sys.stdin.readline()
""")


@pytest.mark.slow  # spawns an interpreter that holds the lock
def test_a_second_run_on_one_output_is_refused_at_once_naming_the_holder(model_dir, data_dir, tmp_path, capsys):
    output = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(output)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert main(["quantize", str(model_dir), "--nsamples", "2", "--seqlen", "8", "--data-dir", str(data_dir),
                     "-o", str(output), "-q"]) == 2
        err = capsys.readouterr().err
        assert f"being written by another compquant run (process {holder.pid} on " in err and "--output" in err
        assert err.count("\n") == 1 and not output.exists()
        assert not (tmp_path / ".out.compquant-resume").exists()
    finally:
        holder.communicate("done\n")
    assert not lock_file(output).exists()  # the holder removed it on release


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_log_line(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock_file(tmp_path / "out").write_text(json.dumps({"pid": dead.pid, "host": "here", "started": "earlier"}))
    with caplog.at_level(logging.WARNING, logger="compquant.core.lock"), exclusive(tmp_path / "out") as path:
        assert json.loads(path.read_text())["pid"] != dead.pid
    assert f"left by a run that is no longer running (process {dead.pid} on here" in caplog.text
    assert not lock_file(tmp_path / "out").exists()


def test_the_lock_is_reentrant_within_a_process_and_exclusive_between_descriptors(tmp_path):
    import fcntl
    import os

    with exclusive(tmp_path / "out") as path, exclusive(tmp_path / "out"):
        descriptor = os.open(path, os.O_RDWR)  # what another process's open would get
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(descriptor)
        assert path.exists()
    assert not path.exists()


def test_a_staging_folder_left_by_a_killed_save_is_removed_by_the_next_one(make_llama, tmp_path, caplog):
    stale = tmp_path / ".out.abcd1234.partial"  # what mkdtemp named the staging folder of a run killed in its save
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    other = tmp_path / ".out.v2.abcd1234.partial"  # another output's ("out.v2"): never touched
    other.mkdir()
    model = make_llama()
    config = QuantConfig(solver="rtn", grid={"bits": 8, "group_size": -1})
    report = compquant.quantize(model, config)
    with caplog.at_level(logging.WARNING, logger="compquant.core.saving"):
        compquant.save_quantized(model, None, tmp_path / "out", config=config, report=report, format="fake")
    assert not stale.exists() and other.exists() and "left by a run that was killed while saving" in caplog.text


def test_a_resume_folder_is_locked_while_a_python_run_uses_it(make_llama, token_batches, tmp_path):
    class Probe:
        seen = None

        @compquant.hookimpl
        def compquant_after_block(self, index, block, report):
            Probe.seen = lock_file(tmp_path / "resume").exists()

    pm = compquant.create_plugin_manager()
    pm.register(Probe())
    compquant.quantize(make_llama(), QuantConfig(solver="gptq", grid={"group_size": 32}), calibration=token_batches(2, 8),
                       resume_dir=tmp_path / "resume", plugin_manager=pm)
    assert Probe.seen is True and not lock_file(tmp_path / "resume").exists()
    assert issubclass(OutputLockedError, compquant.CompquantError)
