"""Shared fixtures (a tiny generated labelled audio set with teacher-target stores, a small CLAP
teacher, a pretraining checkpoint, a tiny keyword set), the `slow` marker and the fast lane's
guard: a test not marked `slow` may start no process."""
import importlib.util
import multiprocessing.process
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from mam_clap_plugin.data.manifest import write_class_list, write_labels, write_manifest
from mam_clap_plugin.data.target_store import TargetStoreHeader, create_target_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "examples", "pretraining", "config")

# ---------------------------------------------------------------- the slow marker and the fast lane

#: Fixtures that train (fairseq-hydra-train in a subprocess): every test that uses one, directly
#: or through another fixture, is marked `slow` at collection.
TRAINING_FIXTURES = ("pretraining_checkpoint",)

#: The processes a test outside the `slow` lane may start, by the function that starts them
#: (module, function): cheap helpers that belong to a fixture.
ALLOWED_PROCESSES = {
    ("tests.readme", "words"): "bash expands a README command's words (milliseconds)",
    ("mam_clap_fixtures.speech", "synthesize_speech"):
        "the eSpeak NG worker that renders generated speech (a fresh process keeps it reproducible)",
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: starts subprocesses or trains (fairseq-hydra-train, scripts, s3prl); "
        "`make test-fast` runs everything else")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Mark the users of a training fixture `slow` before `-m "not slow"` deselects."""
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in TRAINING_FIXTURES):
            item.add_marker(pytest.mark.slow)


def _allowed_starter():
    """(module, function) of an allowed process starter on the call stack, else None."""
    frame = sys._getframe(1)
    while frame is not None:
        caller = (frame.f_globals.get("__name__"), frame.f_code.co_name)
        if caller in ALLOWED_PROCESSES:
            return caller
        frame = frame.f_back
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Outside the `slow` lane (setup, call and teardown of a test not marked `slow`), starting a
    process fails the test: ``subprocess.Popen`` (``run``, ``check_output``, ...) and
    ``multiprocessing`` (``torch.multiprocessing``, DataLoader workers), except the helpers in
    :data:`ALLOWED_PROCESSES`. `make test` and `make test-fast` both enforce it."""
    if item.get_closest_marker("slow") is not None:
        yield
        return
    execute_child = subprocess.Popen._execute_child
    start = multiprocessing.process.BaseProcess.start

    def refuse(what):
        pytest.fail(f"{item.nodeid} starts a process ({what}) but is not marked slow: add "
                    "@pytest.mark.slow (tests/conftest.py: pytest_runtest_protocol)", pytrace=False)

    def guarded_execute_child(self, args, *rest, **kwargs):
        if _allowed_starter() is None:
            refuse(f"subprocess {args if isinstance(args, (str, bytes)) else list(args)[:3]}")
        return execute_child(self, args, *rest, **kwargs)

    def guarded_start(self):
        if _allowed_starter() is None:
            refuse(f"multiprocessing {type(self).__name__}")
        return start(self)

    subprocess.Popen._execute_child = guarded_execute_child
    multiprocessing.process.BaseProcess.start = guarded_start
    try:
        yield
    finally:
        subprocess.Popen._execute_child = execute_child
        multiprocessing.process.BaseProcess.start = start


# ---------------------------------------------------------------- helpers and fixtures


def load_script(relpath: str, name: str | None = None):
    """Import a script of this repository (``examples/...``) by its path, as module ``name``
    (default: the file's stem), without putting its folder on ``sys.path``; whatever the script
    itself does to ``sys.path`` while it is imported is undone, so later tests see the
    interpreter's own path."""
    path = os.path.join(REPO, relpath)
    name = name or os.path.splitext(os.path.basename(path))[0]
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == path:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pickling by reference (worker processes) finds its functions
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


#: Teacher grid and width of the stand-in stores (a random "teacher").
TEACHER_GRID = (2, 32)
TEACHER_DIM = 24
CLASSES = ["low", "mid", "high"]


def store_header(num_clips: int, teacher: str = "random-test-teacher", grid=TEACHER_GRID, dim: int = TEACHER_DIM,
                 **fields) -> TargetStoreHeader:
    """Header of a stand-in target store (LAION-CLAP-like geometry: 10 s at 48 kHz)."""
    edges = [50.0, 2229.63, 14000.0] if grid[0] == 2 else np.linspace(50.0, 14000.0, grid[0] + 1).tolist()
    values = dict(teacher=teacher, checkpoint_sha256="0" * 64, layer="final", projection=False,
                  grid_freq=grid[0], grid_time=grid[1], dim=dim, sample_rate=48000, seconds=10.0,
                  freq_edges_hz=edges, num_clips=num_clips)
    values.update(fields)
    return TargetStoreHeader(**values)


def write_tone_set(root: str, counts=(("train", 12), ("valid", 6)), seconds=0.6, seed=0) -> str:
    """Three tone classes (220/440/880 Hz + noise) as 16 kHz wavs, with manifests, labels,
    a class list and random teacher-target stores in ``root/targets``. Returns root."""
    rng = np.random.default_rng(seed)
    audio = os.path.join(root, "audio")
    os.makedirs(audio, exist_ok=True)
    os.makedirs(os.path.join(root, "targets"), exist_ok=True)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    for split, count in counts:
        names, labels = [], []
        for i in range(count):
            c = i % len(CLASSES)
            x = 0.3 * np.sin(2 * np.pi * 220 * 2**c * t + rng.uniform(0, 6)) + 0.05 * rng.standard_normal(n)
            name = f"{split}_{i}.wav"
            sf.write(os.path.join(audio, name), x.astype(np.float32), 16000)
            names.append(name)
            labels.append([c])
        write_manifest(os.path.join(root, f"{split}.tsv"), audio, names, [n] * count)
        write_labels(os.path.join(root, f"{split}.lbl"), labels)
        header = store_header(count)
        with create_target_store(os.path.join(root, "targets", f"{split}.tgt"), header) as writer:
            for i in range(count):
                writer.write(i, rng.standard_normal((*TEACHER_GRID, TEACHER_DIM)).astype(np.float32))
    write_class_list(os.path.join(root, "classes.txt"), CLASSES)
    return root


@pytest.fixture(scope="session")
def tone_set(tmp_path_factory) -> str:
    return write_tone_set(str(tmp_path_factory.mktemp("tones")))


#: A small LAION-layout CLAP teacher (real key names, HTS-AT geometry, narrow and shallow):
#: final map 2 x 32 x 128.
SMALL_TEACHER = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1])


@pytest.fixture(scope="session")
def clap_checkpoint(tmp_path_factory) -> str:
    """A randomly initialised small teacher saved in LAION-CLAP's checkpoint layout."""
    from mam_clap_fixtures.clap import save_random_clap_checkpoint

    path = tmp_path_factory.mktemp("clap") / "small-laion-clap.pt"
    return save_random_clap_checkpoint(str(path), "laion", seed=0, **SMALL_TEACHER)


#: Encoder of :func:`pretraining_checkpoint`: +size=tiny with 32 dims (2 layers, 4 heads).
PRETRAINED_DIM, PRETRAINED_DEPTH = 32, 2


@pytest.fixture(scope="session")
def pretraining_checkpoint(tone_set, tmp_path_factory) -> str:
    """A real ``checkpoint_last.pt`` written by ``fairseq-hydra-train``: tiny SupMAM
    (``+size=tiny model.encoder_embed_dim=32``), 4 updates on the tone set, 1.28 s clips,
    ``task.norm_stats=speech_commands``. For the tests that load "pretraining checkpoints"."""
    from mam_clap_plugin.hydra_runs import run_hydra_train

    root = tmp_path_factory.mktemp("pretrained")
    overrides = [
        "+size=tiny", f"model.encoder_embed_dim={PRETRAINED_DIM}", f"model.encoder_layers={PRETRAINED_DEPTH}",
        f"task.data={tone_set}", "task.target_length=128", "task.norm_stats=speech_commands",
        "common.cpu=true", "common.seed=3", "common.log_interval=1", "dataset.batch_size=6",
        "dataset.num_workers=0", "optimization.max_update=4", "optimization.update_freq=[1]",
        "optimization.lr=[0.01]", "lr_scheduler.warmup_updates=1", "checkpoint.save_interval_updates=0",
        f"checkpoint.save_dir={root / 'checkpoints'}",
    ]
    run_hydra_train(CONFIG_DIR, "supmam", overrides, str(root / "run"))
    path = root / "checkpoints" / "checkpoint_last.pt"
    assert path.is_file(), f"fairseq-hydra-train wrote no {path}"
    return str(path)


#: Config directory of the caption teacher (examples/teacher).
TEACHER_CONFIG_DIR = os.path.join(REPO, "examples", "teacher", "config")
#: Overrides of the test caption teachers: +size=tiny, 0.64 s clips (the tone clips are 0.6 s).
CAPTION_TEACHER_OVERRIDES = ["+size=tiny", "model.clip_seconds=0.64"]


@pytest.fixture(scope="session")
def caption_set(tmp_path_factory) -> str:
    """Generated clip-caption pairs: the three tone classes (24 train, 12 valid clips of 0.6 s), one
    caption per clip ("the sound of low" ...: examples/teacher/captions.py's code), and a sentencepiece
    tokenizer ``spm.model`` (examples/teacher/train_tokenizer.py). Returns the data directory."""
    from mam_clap_plugin.data.captions import caption_rows, write_captions
    from mam_clap_plugin.data.manifest import read_labels

    root = write_tone_set(str(tmp_path_factory.mktemp("captions")), counts=(("train", 24), ("valid", 12)))
    for split in ("train", "valid"):
        labels = read_labels(os.path.join(root, f"{split}.lbl"), 24 if split == "train" else 12, len(CLASSES))
        write_captions(os.path.join(root, f"{split}.cap"), caption_rows(labels, CLASSES, ["the sound of {}"]))
    load_script("examples/teacher/train_tokenizer.py").main([root, "--vocab-size", "64"])
    return root


def caption_teacher_config(*overrides: str) -> dict:
    """``model.*`` of examples/teacher/config/clap.yaml with :data:`CAPTION_TEACHER_OVERRIDES` (a plain dict)."""
    from omegaconf import OmegaConf

    from mam_clap_plugin.hydra_runs import compose_config

    cfg = compose_config(TEACHER_CONFIG_DIR, "clap", [*CAPTION_TEACHER_OVERRIDES, "task.data=unused", *overrides])
    return OmegaConf.to_container(cfg.model)


@pytest.fixture(scope="session")
def caption_teacher_checkpoint(caption_set, tmp_path_factory) -> str:
    """An untrained tiny caption teacher saved in the layout fairseq's trainer writes."""
    from mam_clap_fixtures.clap import save_random_caption_teacher

    with open(os.path.join(caption_set, "spm.model"), "rb") as f:
        tokenizer = f.read()
    path = str(tmp_path_factory.mktemp("caption_teacher") / "untrained.pt")
    return save_random_caption_teacher(path, caption_teacher_config(), tokenizer, seed=0)


@pytest.fixture
def no_syncs(monkeypatch):
    """Make every host-device sync a Python call can cause raise: scalar reads, lists, truth values,
    boolean indexing (data-dependent shapes: nonzero / masked_select)."""

    def refuse(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"host-device sync in the training step: {what}")
        return fail

    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "nonzero", "masked_select"):
        monkeypatch.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
    for name in ("nonzero", "masked_select", "unique", "argwhere"):
        monkeypatch.setattr(torch, name, refuse(f"torch.{name}"))
    getitem = torch.Tensor.__getitem__

    def checked_getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(torch.is_tensor(i) and i.dtype == torch.bool for i in parts):
            raise AssertionError("host-device sync in the training step: boolean indexing")
        return getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", checked_getitem)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    tiny models are dominated by per-op overhead, which extra threads only add to on a busy
    2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def keywords(tmp_path_factory):
    """A tiny keyword set (examples/prepare/make_demo_keywords.py): 6 voices (4 train, 1 dev,
    1 test speaker), 2 s noise files. Returns (root, summary)."""
    mdk = load_script("examples/prepare/make_demo_keywords.py")
    out = tmp_path_factory.mktemp("kw") / "set"
    summary = mdk.make_demo_keywords(out, seed=3, voices=6, clips_per_word=1, noise_seconds=2.0, progress=False)
    return out, summary
