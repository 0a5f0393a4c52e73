"""The codec: round trip across processes, estimate vs real bytes, checkpoints with CDF tables, fingerprint
refusal, bad input, a training step that learns, and eval's JSON keys. Tiny models (64 px), real parts."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from codec.api import (CheckpointError, CodecError, EncodedFrame, ForeignBitstreamError, SplitCodec, load_codec,
                       load_edge)

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64


@pytest.fixture(scope="module")
def codec() -> SplitCodec:
    return SplitCodec.random(input_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    from conveyor.line import ConveyorLine, LineConfig

    return np.stack([f.image for f in ConveyorLine(LineConfig(size=SIZE, seed=3)).frames(4)])


@pytest.fixture(scope="module")
def checkpoint(codec, tmp_path_factory) -> Path:
    return codec.save(tmp_path_factory.mktemp("ckpt") / "split.pt")


def test_encode_decode_round_trip_in_a_second_process(codec, frames, checkpoint, tmp_path):
    encoded = codec.encode(frames)
    assert [e.latent_shape for e in encoded] == [(24, SIZE // 4, SIZE // 4)] * len(frames)
    local = codec.decode_latents(encoded).numpy()
    # the latent the decoder recovers is exactly the encoder's quantised latent
    symbols = codec.latents(frames)
    medians = codec.entropy_bottleneck._get_medians().detach()
    assert torch.equal(codec.entropy_bottleneck.dequantize(symbols, medians), torch.from_numpy(local))

    payloads = tmp_path / "payloads.pkl"
    payloads.write_bytes(pickle.dumps([(e.payload, e.latent_shape, e.fingerprint) for e in encoded]))
    out = tmp_path / "latents.npy"
    script = (
        "import pickle, sys, numpy as np\n"
        "from codec.api import load_codec, EncodedFrame\n"
        "c = load_codec(sys.argv[1])\n"
        "enc = [EncodedFrame(p, tuple(s), f) for p, s, f in pickle.load(open(sys.argv[2], 'rb'))]\n"
        "np.save(sys.argv[3], c.decode_latents(enc).numpy())\n"
    )
    subprocess.run([sys.executable, "-c", script, str(checkpoint), str(payloads), str(out)], check=True,
                   cwd=ROOT, timeout=300)
    remote = np.load(out)
    assert remote.dtype == local.dtype and np.array_equal(remote, local)


def test_real_bytes_match_the_estimate(codec, frames):
    encoded = codec.encode(frames)
    real = sum(len(e.payload) for e in encoded)
    estimate = sum(codec.estimate_bytes(frames))
    # rANS overhead: a few bytes per frame on top of the estimate
    assert abs(real - estimate) <= 0.01 * estimate + 8 * len(frames), (real, estimate)


def test_checkpoint_save_load_keeps_cdf_tables_and_bytes(codec, frames, checkpoint, tmp_path):
    loaded = load_codec(checkpoint)
    for name in ("_quantized_cdf", "_offset", "_cdf_length", "quantiles"):
        assert torch.equal(getattr(loaded.entropy_bottleneck, name), getattr(codec.entropy_bottleneck, name)), name
    assert loaded.fingerprint == codec.fingerprint
    assert [e.payload for e in loaded.encode(frames)] == [e.payload for e in codec.encode(frames)]
    edge_path = codec.save_edge(tmp_path / "edge.pt")
    assert edge_path.stat().st_size < 1_000_000
    edge = load_edge(edge_path)
    assert edge.fingerprint == codec.fingerprint
    assert [e.payload for e in edge.encode(frames)] == [e.payload for e in codec.encode(frames)]
    # the server decodes what the edge-only process encoded, and the heads give per-frame results
    results = loaded.heads(loaded.decode(edge.encode(frames)))
    assert len(results) == len(frames)
    # load_codec folds BatchNorms for inference: the same results as the unfused model, and it refuses to be saved
    plain = load_codec(checkpoint, fuse=False)
    assert loaded.fused and not plain.fused
    ref = plain.heads(plain.decode(edge.encode(frames)), conf=0.0)
    got = loaded.heads(loaded.decode(edge.encode(frames)), conf=0.0)
    for r, g in zip(ref, got):
        assert len(r["detection"]["boxes"]) == len(g["detection"]["boxes"])
        np.testing.assert_allclose(r["detection"]["boxes"], g["detection"]["boxes"], atol=1e-2)
        assert (r["segmentation"] == g["segmentation"]).mean() > 0.999
        assert r["classification"]["label"] == g["classification"]["label"]
    with pytest.raises(CodecError, match="folded"):
        loaded.save(tmp_path / "fused.pt")
    assert results[0]["segmentation"].shape == (SIZE, SIZE)
    assert set(results[0]["detection"]) == {"boxes", "scores", "classes"}


def test_foreign_fingerprint_and_wrong_shape_are_refused(codec, frames):
    other = SplitCodec.random(input_size=SIZE, seed=1)
    assert other.fingerprint != codec.fingerprint
    foreign = other.encode(frames[:1])
    with pytest.raises(ForeignBitstreamError, match="model"):
        codec.decode(foreign)
    good = codec.encode(frames[:1])[0]
    with pytest.raises(CodecError, match=r"expected \(24, 16, 16\)"):
        codec.decode([EncodedFrame(good.payload, (24, 8, 8), good.fingerprint)])
    with pytest.raises(CodecError, match="empty"):
        codec.decode([EncodedFrame(b"", good.latent_shape, good.fingerprint)])
    # the caller keeps running: the same codec still decodes good payloads
    assert codec.decode([good]).batch == 1


def test_bad_frames_name_what_was_expected(codec, frames):
    with pytest.raises(CodecError, match="uint8"):
        codec.encode(frames.astype(np.float32))
    with pytest.raises(CodecError, match=r"\(B,64,64,3\)"):
        codec.encode(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(CodecError, match="numpy"):
        codec.encode([frames[0]])
    assert len(codec.encode(frames[0])) == 1  # a single (H,W,3) frame is accepted


def test_bad_checkpoints_are_refused_clearly(codec, checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    no_cdf = dict(state, entropy_bottleneck={k: v for k, v in state["entropy_bottleneck"].items()
                                             if k != "_quantized_cdf"})
    torch.save(no_cdf, tmp_path / "no_cdf.pt")
    with pytest.raises(CheckpointError, match="CDF"):
        load_codec(tmp_path / "no_cdf.pt")
    other_arch = dict(state, student_spec=dict(state["student_spec"], latent_channels=16))
    torch.save(other_arch, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="architecture"):
        load_codec(tmp_path / "other.pt")
    torch.save({"model": None, "train_args": {}}, tmp_path / "ultralytics.pt")
    with pytest.raises(CheckpointError, match="format"):
        load_codec(tmp_path / "ultralytics.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_codec(tmp_path / "garbage.pt")
    tampered = dict(state, fingerprint="00" * 16)
    torch.save(tampered, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_codec(tmp_path / "tampered.pt")
    with pytest.raises(FileNotFoundError):
        load_codec(tmp_path / "missing.pt")


def test_a_training_step_lowers_the_stage1_loss(frames):
    from codec.model import SplitModel
    from codec.teachers import MultiTaskTeachers, TeacherSpec
    from codec.train import stage1_loss

    torch.manual_seed(0)
    model = SplitModel(MultiTaskTeachers.from_spec(TeacherSpec(input_size=SIZE)), input_size=SIZE)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    params = [p for n, p in model.named_parameters() if not n.startswith("teachers.")]
    opt = torch.optim.Adam(params, lr=1e-3)
    first = None
    for _ in range(15):
        loss, _parts = stage1_loss(model, x, beta=0.05, layers=[2, 4, 6, 8, 10])
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    last, _ = stage1_loss(model, x, beta=0.05, layers=[2, 4, 6, 8, 10])
    assert float(last) < 0.9 * first
    assert all(not p.requires_grad or p.grad is None for p in model.teachers.parameters())


def test_foreground_weighted_feature_error():
    """Stage 1's item weighting: weight 0 is the plain MSE; an error on item cells costs more than the same error
    on the belt once items weigh more; a cell on an item's edge counts as the item's."""
    import torch.nn.functional as F

    from codec.train import foreground_weighted_mse

    torch.manual_seed(0)
    teacher = torch.randn(2, 8, 4, 4)
    fg = torch.zeros(2, 16, 16, dtype=torch.bool)
    fg[:, 0:4, 0:4] = True  # under feature cell (0, 0) only
    fg[:, 7, 7] = True  # one pixel of cell (1, 1): an edge counts
    on_item, on_belt = teacher.clone(), teacher.clone()
    on_item[:, :, 0, 0] += 1.0
    on_belt[:, :, 3, 3] += 1.0
    assert float(foreground_weighted_mse(on_item, teacher, fg, 0.0)) == pytest.approx(
        float(F.mse_loss(on_item, teacher)), rel=1e-6)
    item, belt = (float(foreground_weighted_mse(s, teacher, fg, 4.0)) for s in (on_item, on_belt))
    assert item == pytest.approx(5 / (14 + 2 * 5), rel=1e-6) and belt == pytest.approx(1 / 24, rel=1e-6)
    edge = teacher.clone()
    edge[:, :, 1, 1] += 1.0
    assert float(foreground_weighted_mse(edge, teacher, fg, 4.0)) == pytest.approx(item, rel=1e-6)


def test_torch_threads_survive_ultralytics_device_setup():
    """Ultralytics' trainer sets torch to cpu_count - 1 threads (one on a 2-core machine) and leaves it so; training
    keeps the heads and the student that follow in the same process on the threads they had."""
    from ultralytics.utils import NUM_THREADS
    from ultralytics.utils.torch_utils import select_device

    from codec.train import _torch_threads_kept

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(NUM_THREADS + 1)
        select_device("cpu", verbose=False)
        assert torch.get_num_threads() == NUM_THREADS  # what the trainer does to the process
        torch.set_num_threads(NUM_THREADS + 1)
        with _torch_threads_kept():
            select_device("cpu", verbose=False)
        assert torch.get_num_threads() == NUM_THREADS + 1
    finally:
        torch.set_num_threads(before)


def test_detector_trainer_trains_on_the_threads_torch_had(tmp_path):
    """Inside Ultralytics' trainer too: its select_device leaves one thread on a 2-core machine (a detector epoch
    1.65x slower than on 2), and the callback training registers gives torch its threads back before any batch."""
    import cv2
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import NUM_THREADS, callbacks

    from codec.train import threads_restorer

    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "images" / split / "a.jpg"), np.full((64, 64, 3), 127, np.uint8))
        (tmp_path / "labels" / split / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    data = tmp_path / "data.yaml"
    data.write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames: {{0: item}}\n")
    overrides = dict(model="yolo26n.yaml", data=str(data), device="cpu", imgsz=64, epochs=1, workers=0,
                     project=str(tmp_path / "runs"), name="t", exist_ok=True, verbose=False, plots=False)
    before = torch.get_num_threads()
    try:
        wanted = NUM_THREADS + 1
        torch.set_num_threads(wanted)
        DetectionTrainer(overrides=dict(overrides))
        assert torch.get_num_threads() == NUM_THREADS  # Ultralytics alone
        torch.set_num_threads(wanted)
        cbs = callbacks.get_default_callbacks()
        cbs["on_pretrain_routine_start"].append(threads_restorer(wanted))
        DetectionTrainer(overrides=dict(overrides), _callbacks=cbs)
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


def test_eval_json_has_the_documented_keys(checkpoint):
    proc = subprocess.run([sys.executable, "run_pipeline.py", "eval", "--checkpoint", str(checkpoint),
                           "--frames", "6", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    for key in ("teacher", "student", "payload_bytes_mean", "payload_bytes_p95", "estimate_bytes_mean",
                "encoder_params", "encoder_macs", "jpeg90_bytes_mean"):
        assert key in result
    for side in ("teacher", "student"):
        assert set(result[side]) >= {"items_ap50", "box_map50_95", "box_map50", "box_ap_per_class", "miou", "fg_iou",
                                     "top1", "majority_top1"}
    assert result["frames"] == 6 and result["suite"] == "heldout"
    assert set(result["suites"]) == {"heldout", "train"} and result["suites"]["train"]["frames"] == 6
    assert result["payload_bytes_mean"] > 0
    by_family = result["suites"]["heldout"]["by_group"]  # 6 frames on 6 lines: every held-out family, twice
    assert sum(g["frames"] for g in by_family.values()) == 6 and all(g["frames"] == 2 for g in by_family.values())
    assert all(set(g["student"]) >= {"box_map50_95", "miou", "top1"} for g in by_family.values())


def test_eval_suite_keeps_every_stride_th_frame_of_each_line_and_takes_the_families_in_turn():
    """The protocol scores frames FRAME_STRIDE video frames apart, so a suite holds many distinct garments: the
    kept frames are exactly frames 0, s, 2s... of each line, their truth the line's own; line k is on the suite's
    belt family k, so every family counts alike."""
    from codec.evaluate import frame_families, suite_families, suite_footage, suite_lines
    from conveyor.belts import HELDOUT_FAMILIES, TRAIN_FAMILIES
    from conveyor.line import ConveyorLine, LineConfig

    assert set(suite_families("heldout")) == set(HELDOUT_FAMILIES)
    assert suite_lines("heldout") % len(HELDOUT_FAMILIES) == 0 and suite_lines("train") % len(TRAIN_FAMILIES) == 0
    images, truth = suite_footage("heldout", 5, seed=7, size=64, lines=2, stride=3)
    assert len(images) == len(truth) == 5
    assert [t.index for t in truth] == [0, 3, 6, 0, 3]  # 3 frames of line seed 7, then 2 of line seed 8
    second = suite_families("heldout")[1]
    line = list(ConveyorLine(LineConfig(size=64, seed=8, fashion_split="test", belts=second)).frames(4))
    assert line[0].belt == second
    assert np.array_equal(truth[4].semantic, line[3].semantic) and truth[4].label == line[3].label
    assert np.abs(images[4].astype(float) - line[3].image).mean() < 6  # that line's frame, through H.264
    assert not np.array_equal(truth[3].semantic, truth[4].semantic)
    assert frame_families("heldout", 5, lines=2) == [suite_families("heldout")[0]] * 3 + [second] * 2
    with pytest.raises(ValueError, match="stride"):
        suite_footage("heldout", 2, seed=7, size=64, stride=0)


def test_eval_scores_labelled_footage_of_any_size(checkpoint, tmp_path):
    """`eval --video V --gt GT`: a non-square clip in the format `data` writes, letterboxed like the pipeline."""
    from conveyor.export import write_video
    from conveyor.line import ConveyorLine, LineConfig

    video = tmp_path / "clip.mp4"
    frames = list(ConveyorLine(LineConfig(size=96, seed=3)).frames(5))
    for f in frames:  # crop to 96x64: the truth must be cropped alike
        f.image, f.semantic = f.image[16:80], f.semantic[16:80]
        f.instance_masks = f.instance_masks[:, 16:80]
        f.boxes = f.boxes.copy()
        f.boxes[:, [1, 3]] = np.clip(f.boxes[:, [1, 3]] - 16, 0, 64)
    write_video(frames, video, 15)
    gt = tmp_path / "truth.jsonl"
    (tmp_path / "clip.gt.jsonl").rename(gt)
    proc = subprocess.run([sys.executable, "run_pipeline.py", "eval", "--checkpoint", str(checkpoint),
                           "--video", str(video), "--gt", str(gt), "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["suite"] == "footage" and result["frames"] == 5 and result["student"]["majority_top1"] > 0
    bad = subprocess.run([sys.executable, "run_pipeline.py", "eval", "--checkpoint", str(checkpoint),
                          "--video", str(video)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "clip.gt.jsonl" in bad.stderr.strip().splitlines()[-1]


def test_eval_with_a_missing_checkpoint_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "run_pipeline.py", "eval", "--checkpoint", str(tmp_path / "nope.pt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "nope.pt" in proc.stderr.strip().splitlines()[-1]


def test_box_metric_leaves_no_folders_behind():
    """Ultralytics' validator makes its save folder when it is built (runs/detect/train-N, or a tests folder under
    pytest): eval used to leave one behind per run. The metric's matcher gets a scratch folder, removed again."""
    from codec.metrics import DetectionMetric

    metric = DetectionMetric()
    metric.add({"boxes": [[0, 0, 10, 10]], "classes": [1], "scores": [0.9]}, (np.array([[0, 0, 10, 10]]), np.array([1])))
    assert metric.summary()["items_ap50"] > 99
    assert not Path(metric._matcher.save_dir).exists(), metric._matcher.save_dir


def test_a_smaller_encoder_kernel_round_trips_and_counts_fewer_macs(codec, frames, tmp_path):
    from codec.student import StudentSpec, count_macs

    spec = StudentSpec(split_channels=codec.model.spec.split_channels, encoder_kernels=(5, 3))
    small = SplitCodec.random(input_size=SIZE, seed=0, spec=spec)
    assert small.fingerprint != codec.fingerprint  # a different architecture is a different model
    assert "encoder_kernels" not in codec.model.spec.to_dict()  # the default keeps earlier checkpoints' fingerprints
    assert StudentSpec.from_dict(spec.to_dict()) == spec
    shape = (1, 3, SIZE, SIZE)
    assert count_macs(small.model.encoder, shape) < 0.7 * count_macs(codec.model.encoder, shape)
    edge = load_edge(small.save_edge(tmp_path / "edge.pt"))
    loaded = load_codec(small.save(tmp_path / "split.pt"))
    assert loaded.model.spec.encoder_kernels == (5, 3)
    encoded = edge.encode(frames)
    assert [e.payload for e in encoded] == [e.payload for e in small.encode(frames)]
    assert len(loaded.heads(loaded.decode(encoded))) == len(frames)
