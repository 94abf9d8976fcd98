"""Bad user input at every entry point: one line naming the problem, exit 2, no traceback, nothing started.

And the control commands stay light: no torch or transformers for `zoctl status`.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_cluster import write_config, zoctl, zoctl_here

NOT_UTF8 = b"train:\n  steps: 3\n  # caf\xe9 \xff\n"


def one_clean_line(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.count("\n") <= 1 and "Traceback" not in r.stderr, r.stderr[-2000:]


def module(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


def test_non_utf8_config_and_data_files(cache_dir, tmp_path):
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_bytes(NOT_UTF8)
    good_cfg = write_config(tmp_path, cache_dir)
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_bytes(b'{"text": "fine", "label": 1}\n{"text": "caf\xe9", "label": 0}\n')
    run = tmp_path / "run"
    cases = [
        (["up", "--config", str(bad_cfg), "--run-dir", str(run)], f"config file '{bad_cfg}' is not UTF-8 text"),
        (["reference", "--config", str(bad_cfg)], "is not UTF-8 text (byte 0xe9"),
        (["config", str(bad_cfg)], "is not UTF-8 text"),
        (["train", "--config", str(bad_cfg), "--coordinator", "127.0.0.1:1"], "is not UTF-8 text"),
        (["up", "--config", str(good_cfg), "--data", str(bad_data), "--run-dir", str(run)], f"{bad_data}:2: not UTF-8 text"),
        (["reference", "--config", str(good_cfg), "--data", str(bad_data)], f"{bad_data}:2: not UTF-8 text"),
    ]
    token = tmp_path / "token"
    token.write_bytes(b"\xff\xfe")
    cases.append((["pause", "--coordinator", "127.0.0.1:1", "--token-file", str(token)], "cannot be read as UTF-8 text"))
    logdir = tmp_path / "logdir"
    logdir.mkdir()
    (logdir / "steps.jsonl").write_bytes(b'{"step": 0, "loss": 1.0}\n\xff\n')
    cases.append((["report", str(logdir)], "steps.jsonl is not UTF-8 text"))
    for i, (args, needle) in enumerate(cases):  # the first through the process, the rest through its main() here
        r = zoctl(*args, timeout=300) if i == 0 else zoctl_here(*args)
        one_clean_line(r)
        assert needle in r.stderr, (args, r.stderr)
    assert not run.exists()  # nothing started


def test_a_truncated_checkpoint_is_refused_before_anything_starts(cache_dir, preset, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(preset("tiny-opt"), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cfg = write_config(tmp_path, cache_dir)
    for cmd in ("up", "reference"):  # up through the process, reference through its main() here
        extra = ["--run-dir", str(tmp_path / "run")] if cmd == "up" else []
        r = (zoctl if cmd == "up" else zoctl_here)(cmd, "--config", str(cfg), "--model", str(model), *extra)
        one_clean_line(r)
        assert f"model weights '{weights}' cannot be read" in r.stderr and "truncated or damaged" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def taken_port(reuseport: bool = False) -> tuple[socket.socket, int]:
    """A port held by a listening socket; ``reuseport``: one with SO_REUSEPORT, as any gRPC server sets it by
    default, so the operating system would let a second socket with it bind the same port."""
    s = socket.socket()
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, s.getsockname()[1]


def test_no_two_services_share_a_port_even_where_the_os_would_let_them(tmp_path):
    """Issue 25, kind 4: gRPC's default SO_REUSEPORT let a second server bind a port a running one listens on
    (and split the connections between them). Every listening port of every service goes through these two."""
    from concurrent import futures

    import grpc

    from distzo.infra.metrics import start_metrics_server
    from distzo.infra.rpc import Credentials, bind, make_server

    creds = Credentials.for_client(None, None)
    holder, port = taken_port(reuseport=True)
    try:
        with pytest.raises(OSError, match=f"cannot listen on '127.0.0.1:{port}': the port is in use"):
            bind(make_server(creds, []), f"127.0.0.1:{port}", creds)
        with pytest.raises(OSError, match=f"cannot serve metrics on port {port}"):
            start_metrics_server(port, "127.0.0.1")
    finally:
        holder.close()
    first = make_server(creds, [])  # a running distzo service: nothing, reuse or not, binds its port again
    port = bind(first, "127.0.0.1:0", creds)
    first.start()
    try:
        with pytest.raises(OSError, match="the port is in use"):
            bind(make_server(creds, []), f"127.0.0.1:{port}", creds)
        plain = grpc.server(futures.ThreadPoolExecutor(1))  # gRPC's defaults: SO_REUSEPORT on
        try:
            assert plain.add_insecure_port(f"127.0.0.1:{port}") == 0
        except RuntimeError:  # "Failed to bind": what newer gRPC raises
            pass
    finally:
        first.stop(None)


def test_listen_on_a_taken_or_invalid_address_and_a_taken_metrics_port(tmp_path):
    sock, port = taken_port()
    shared, shared_port = taken_port(reuseport=True)
    cases = []
    for service, extra in (("paramserver", ["--data-dir", str(tmp_path / "d")]),
                           ("coordinator", ["--param-server", "127.0.0.1:1"])):
        for address in (f"127.0.0.1:{port}", "not-an-address", "10.255.255.1:7070"):
            cases.append(([service, *extra, "--listen", address, "--metrics-port", "-1"], f"cannot listen on '{address}'"))
        cases.append(([service, *extra, "--listen", "127.0.0.1:0", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
                      f"cannot serve metrics on port {port}"))
    cases.append((["gpuworker", "--coordinator", "127.0.0.1:1", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
                  f"cannot serve metrics on port {port}"))
    # a port held with SO_REUSEPORT (as a gRPC server holds it by default): refused all the same (issue 25)
    address = f"127.0.0.1:{shared_port}"
    cases += [(["paramserver", "--data-dir", str(tmp_path / "d"), "--listen", address, "--metrics-port", "-1"],
               f"cannot listen on '{address}'"),
              (["paramserver", "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0", "--control-listen", address,
                "--metrics-port", "-1"], f"cannot listen on '{address}'"),
              (["coordinator", "--param-server", "127.0.0.1:1", "--listen", address, "--metrics-port", "-1"],
               f"cannot listen on '{address}'")]
    try:  # all at once: each start loads torch, which takes seconds on a busy host
        procs = [(subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                  args, needle) for args, needle in cases]
        for proc, args, needle in procs:
            out, err = proc.communicate(timeout=300)
            r = subprocess.CompletedProcess(args, proc.returncode, out, err)
            one_clean_line(r)
            assert needle in r.stderr, (args, r.stderr)
    finally:
        sock.close()
        shared.close()
    assert not (tmp_path / "d").exists()  # the server refused before making its data directory


def test_status_and_control_commands_import_only_what_they_need(tmp_path):
    probe = ("import json, sys, time\n"
             "t = time.perf_counter()\n"
             "from coordinator.zoctl.cli import main\n"
             f"rc = main(sys.argv[1:])\n"
             "heavy = [m for m in ('torch', 'transformers', 'numpy', 'pydantic', 'safetensors') if m in sys.modules]\n"
             "print(json.dumps({'rc': rc, 'heavy': heavy, 'seconds': time.perf_counter() - t}))\n")
    for args in (["status", "--coordinator", "127.0.0.1:1"], ["pause", "--coordinator", "127.0.0.1:1"],
                 ["snapshot", "--coordinator", "127.0.0.1:1", "--json"]):
        r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
        doc = json.loads(r.stdout.strip().splitlines()[-1])
        assert doc["rc"] == 3 and doc["heavy"] == [], (args, doc, r.stderr[-500:])
        print(args[0], f"{doc['seconds']:.2f}s")  # shown with -s; not asserted (this host is shared)


def test_a_model_or_data_that_names_nothing_is_refused_before_the_heavy_imports(tmp_path):
    """Issue 25: a misspelled model or a missing data file took 11-13 s to be refused (torch and transformers
    were imported first); config errors take under a second. Now the names are checked first."""
    probe = ("import json, sys\n"
             "from coordinator.zoctl.cli import main\n"
             "rc = main(sys.argv[1:])\n"
             "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
             "print(json.dumps({'rc': rc, 'heavy': heavy}))\n")
    for args, needle in ((["up", "--model", "smollm2-13"], "model 'smollm2-13' does not exist"),
                         (["reference", "--data", str(tmp_path / "nope.jsonl")], "nope.jsonl' does not exist"),
                         (["up", "--dev", str(tmp_path / "nope.jsonl"), "--run-dir", str(tmp_path / "run")],
                          "does not exist")):
        r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
        doc = json.loads(r.stdout.strip().splitlines()[-1])
        assert doc == {"rc": 2, "heavy": []} and needle in r.stderr and r.stderr.count("\n") == 1, (args, doc, r.stderr)
    assert not (tmp_path / "run").exists()


def test_up_json_errors_and_a_subcommands_usage(capsys):
    """Issue 25: `zoctl up --json` printed nothing on stdout when it failed; `zoctl up --modle x` printed zoctl's
    usage instead of up's."""
    from coordinator.zoctl.cli import main

    assert main(["up", "--model", "nope", "--json"]) == 2
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert doc["exit_code"] == 2 and doc["command"] == "up" and "model 'nope' does not exist" in doc["error"]
    assert out.err.count("\n") == 1
    assert main(["up", "--modle", "x"]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("usage: zoctl up ") and "zoctl up: error: unrecognized arguments: --modle x; did you " \
        "mean --model?" in out.err and out.out == ""
    assert main(["reference", "--steps", "x", "--json"]) == 2
    out = capsys.readouterr()
    assert json.loads(out.out)["error"] == "argument --steps: invalid int value: 'x'" and "usage: zoctl reference" in out.err


def test_an_export_destination_is_checked_before_any_work(cache_dir, tmp_path, capsys):
    """Kind 4 of issue 28: what the export at the end would refuse is refused before training, by `zoctl up`
    and `zoctl reference` alike: one line, exit 2, nothing started, nothing written."""
    import importlib.util

    from coordinator.zoctl.cli import main

    cfg = write_config(tmp_path, cache_dir, server={"export_root": str(tmp_path / "exports")})
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "a-file").write_text("x")
    (tmp_path / "exports" / "mine").mkdir()
    (tmp_path / "exports" / "mine" / "notes.txt").write_text("keep")
    cases = [([], "outside server.export_root"),  # zoctl up's default, <run dir>/model, is outside it
             (["--out", str(tmp_path / "elsewhere")], "outside server.export_root"),
             (["--out", str(tmp_path / "exports" / "a-file")], "is a file"),
             (["--out", str(tmp_path / "exports" / "mine")], "holds files that are not a distzo export"),
             (["--out", "http://example.invalid/m"], "export URL scheme 'http' is not one of"),
             (["--out", (tmp_path / "elsewhere").as_uri()], "is outside server.export_root")]
    if importlib.util.find_spec("s3fs") is None:
        cases.append((["--out", "s3://bucket/m"], "export URL scheme 's3' needs a library that is not installed here"))
    for args, needle in cases:
        for cmd in ("up", "reference"):
            if cmd == "reference" and not args:
                continue  # the reference exports only with --out
            assert main([cmd, "--config", str(cfg), "--run-dir", str(tmp_path / "run"), *args]) == 2, (cmd, args)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and needle in err, (cmd, args, err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "elsewhere").exists()
    assert (tmp_path / "exports" / "mine" / "notes.txt").read_text() == "keep"
