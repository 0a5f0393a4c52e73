"""Hostile or broken input to the CLI (issue 12, config half): binary and alias-bomb configs, unknown `--set`
names, key files of the wrong kind, garbage checkpoints, image folders and videos that give nothing or end early.

Each case runs the real CLI in a subprocess and wants exit 2, no traceback and one `error:` line naming the value
(a few seconds each: no model is built; the source cases use a two-stage graph, source -> util.delay)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from core.errors import UsageError
from pipeline.graph import MAX_YAML_NODES, graph_variables, load_yaml

ROOT = Path(__file__).resolve().parent.parent

PASS_GRAPH = """\
name: replay
vars: {source: none, rate: max}
stages:
  - {name: source, key: source.auto, params: {uri: "${source}", rate: "${rate}"}}
  - {name: pass, key: util.delay, inputs: [source], params: {ms: 0}}
"""


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run_pipeline.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def run_cli(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`run` with its output (and key) folder under tmp_path, never the checkout's out/."""
    return cli("run", "--insecure", "--out", str(tmp_path / "out"), *args, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, no traceback, exactly one `error:` line (the last) holding every word; returns that line."""
    err = proc.stderr
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """'Billion laughs': each level lists the previous one `width` times, 9**9 strings from about 1.4 kB."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


@pytest.fixture()
def graph(tmp_path: Path) -> Path:
    p = tmp_path / "replay.yaml"
    p.write_text(PASS_GRAPH)
    return p


# --------------------------------------------------------------------------------------------- config files
def test_binary_config(tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(bytes(range(256)) * 8)
    one_error_line(run_cli(tmp_path, "--config", str(p)), str(p), "not a text file")
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"name: g\x00\n")
    one_error_line(run_cli(tmp_path, "--config", str(nul)), str(nul), "binary")


def test_alias_bomb_config_is_refused_at_once(tmp_path):
    bomb = "name: g\nvars:\n" + "".join(f"  {ln}\n" for ln in alias_bomb().splitlines()) + \
           'stages:\n  - {name: s, key: source.video, params: {path: "${a8}"}}\n'
    p = tmp_path / "bomb.yaml"
    p.write_text(bomb)
    assert p.stat().st_size < 2000
    t0 = time.monotonic()
    one_error_line(run_cli(tmp_path, "--config", str(p), timeout=30), str(p), "aliases", f"{MAX_YAML_NODES:,}")
    assert time.monotonic() - t0 < 30
    # the same bomb as a --set value
    flow = "{" + ", ".join(alias_bomb().splitlines()) + "}"
    one_error_line(run_cli(tmp_path, "--config", str(p), "--set", f"x={flow}", timeout=30), "--set x", "aliases")


def test_yaml_limits_and_harmless_aliases():
    with pytest.raises(UsageError, match="recursive"):
        load_yaml("a: &a [1, *a]\n", "f.yaml")
    with pytest.raises(UsageError, match="levels deep"):
        load_yaml("a: " + "[" * 500 + "]" * 500 + "\n", "f.yaml")
    with pytest.raises(UsageError, match="line 2, column"):  # one line, with where
        load_yaml("a: [\n", "f.yaml")
    data = load_yaml("base: &p {rate: max, uri: x}\nstages:\n  - {name: a, params: {<<: *p, uri: y}}\n", "f.yaml")
    assert data["stages"][0]["params"] == {"rate": "max", "uri": "y"}  # merge keys and small aliases still work


def test_other_config_mistakes_stay_one_line(tmp_path):
    cases = {"list.yaml": ("- 1\n- 2\n", "must be a mapping"),
             "syntax.yaml": ("name: g\nstages: [\n", "not valid YAML"),
             "twodocs.yaml": ("name: g\n---\nname: h\n", "single document"),
             "key.yaml": ("name: g\nstages:\n  - {name: a, key: camera.magic}\n", "camera.magic"),
             "stagekey.yaml": ("name: g\nstages:\n  - {name: a, key: source.video, colour: 1}\n", "colour")}
    for name, (text, word) in cases.items():
        (tmp_path / name).write_text(text)
        one_error_line(run_cli(tmp_path, "--config", str(tmp_path / name)), name, word)
    one_error_line(run_cli(tmp_path, "--config", str(tmp_path)), str(tmp_path), "is a folder")


def test_unknown_set_variable_is_named_with_the_known_ones(graph, tmp_path):
    line = one_error_line(run_cli(tmp_path, "--config", str(graph), "--set", "nosuchvar=1"), "nosuchvar", str(graph))
    assert "known: " in line and "rate" in line and "source" in line
    one_error_line(run_cli(tmp_path, "--config", str(graph), "--set", "no equals sign"), "NAME=VALUE")
    assert graph_variables(str(graph)) == {"source", "rate"}
    assert {"connect", "secret_key", "server_key", "insecure"} <= graph_variables("edge")  # README's --set


# --------------------------------------------------------------------------------------------- keys
def test_key_files_of_the_wrong_kind(tmp_path):
    keys = tmp_path / "keys"
    for name in ("server", "cam1"):
        proc = cli("keys", "--out", str(keys), "--name", name, "--allow", str(keys / "allowed"))
        assert proc.returncode == 0, proc.stderr
    server = ["server", "--bind", "tcp://127.0.0.1:1", "--out", str(tmp_path / "out"), "--checkpoint", "random:64"]
    line = one_error_line(cli(*server, "--key", str(keys / "server.key_secret"), "--allowed-keys",
                              str(keys / "cam1.key")), "cam1.key", "is a file", "folder of public keys")
    assert "does not exist" not in line
    one_error_line(cli(*server, "--key", str(keys / "server.key"), "--allowed-keys", str(keys / "allowed")),
                   "server.key", "key_secret")
    edge = ["edge", "--source", "conveyor:1", "--connect", "tcp://127.0.0.1:1", "--checkpoint", "random:64",
            "--key", str(keys / "cam1.key_secret")]
    one_error_line(cli(*edge, "--server-key", str(keys / "server.key_secret")), "server.key_secret", "SECRET",
                   "public key is expected")
    (tmp_path / "junk.key").write_text('public-key = "tooshort"\n')
    one_error_line(cli(*edge, "--server-key", str(tmp_path / "junk.key")), "junk.key", "40 Z85")
    one_error_line(cli("keys", "--out", str(tmp_path / "junk.key"), "--name", "x"), "junk.key", "is a file")
    one_error_line(cli("keys", "--out", str(keys), "--name", "cam2", "--allow", str(keys / "cam1.key")),
                   "cam1.key", "is a file", "--allowed-keys")
    assert not (keys / "cam2.key").exists()  # refused before anything is written


# --------------------------------------------------------------------------------------------- checkpoints
def test_garbage_checkpoints_are_one_line(tmp_path):
    import torch

    from pipeline.codecs import get_codec

    torch.save(torch.nn.Linear(2, 2), tmp_path / "foreign.pt")  # a whole pickled module: needs code to load
    proc = cli("edge", "--source", "conveyor:1", "--connect", "ipc:///tmp/ladon-test-nowhere",
               "--checkpoint", str(tmp_path / "foreign.pt"))
    one_error_line(proc, str(tmp_path / "foreign.pt"), "pickled code", "expected a split-model checkpoint")
    assert "Weights only load failed" not in proc.stderr
    # the other kinds in this process (the CLI turns the same UsageError into its `error:` line)
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    (tmp_path / "notes.pt").write_text("this is a text file, not a model\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    for name, word in (("random.pt", "not a PyTorch file"), ("notes.pt", "not a PyTorch file"),
                       ("empty.pt", "is empty"), ("tensor.pt", "holds a Tensor"), (".", "is a folder")):
        with pytest.raises(UsageError) as e:
            get_codec(str(tmp_path / name), edge_only=True)
        msg = str(e.value)
        assert "\n" not in msg and word in msg and "expected a split-model checkpoint" in msg, msg
        assert str(tmp_path / name).rstrip("/.") in msg, msg


# --------------------------------------------------------------------------------------------- sources
def test_image_folder_with_nothing_readable(graph, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(np.random.default_rng(1).integers(0, 256, 600, np.uint8).tobytes())
    (folder / "notes.txt").write_text("not an image")
    one_error_line(run_cli(tmp_path, "--config", str(graph), "--source", str(folder)), str(folder),
                   "none of its 1 image", "a.jpg")


def test_image_folder_with_an_unreadable_image_replays_the_rest_then_exits_2(graph, tmp_path):
    import cv2

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((10, 12, 3), i * 50, np.uint8))
    (folder / "001b.jpg").write_bytes(b"garbage")
    out = tmp_path / "out"
    one_error_line(run_cli(tmp_path, "--config", str(graph), "--source", str(folder)), "001b.jpg", "1 unreadable",
                   "3 readable")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["pass"]["processed"] == 3 and summary["exit_code"] == 2
    assert summary["incomplete_input"] and "001b.jpg" in summary["incomplete_input"][0]


def _faststart_mp4(path: Path, n: int) -> Path:
    """An H.264 MP4 with its index (moov) first, like a streamed recording: cut short, it still plays a part."""
    import av

    from conveyor.line import ConveyorLine, LineConfig
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=Fraction(15, 1))
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for f in ConveyorLine(LineConfig(size=64, seed=1)).frames(n):
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f.image), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def _cut_in_half(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def test_truncated_videos(graph, tmp_path):
    from conveyor.export import write_video
    from conveyor.line import ConveyorLine, LineConfig

    run = ["run", "--insecure", "--config", str(graph), "--rate", "max"]
    whole = tmp_path / "clip.mp4"
    write_video(ConveyorLine(LineConfig(size=64, seed=1)).frames(20), whole, 15)
    proc = cli(*run, "--source", str(whole), "--out", str(tmp_path / "ok"))
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr  # a complete file: no false alarm
    # the project's writer puts the index at the end: half a file has none and cannot be opened
    half = _cut_in_half(whole, tmp_path / "half.mp4")
    one_error_line(cli(*run, "--source", str(half), "--out", str(tmp_path / "o1")), "half.mp4", "truncated")
    # index first: half a file decodes its first frames, then ends; those frames go through, the run exits 2
    long = _faststart_mp4(tmp_path / "long.mp4", 60)
    cut = _cut_in_half(long, tmp_path / "cut.mp4")
    out = tmp_path / "o2"
    line = one_error_line(cli(*run, "--source", str(cut), "--out", str(out)), "cut.mp4", "of the 60 frames",
                          "truncated")
    got = json.loads((out / "summary.json").read_text())["stages"]["pass"]["processed"]
    assert 0 < got < 60 and f"after {got} of the 60" in line
