"""The container files, checked without a Docker engine: lint, schema, and what they claim."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("dockerfile", ["Dockerfile.server", "Dockerfile.client"])
def test_hadolint_passes_at_its_default_threshold(dockerfile):
    done = subprocess.run(
        [str(BIN / "hadolint"), str(ROOT / dockerfile)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_is_valid_compose_spec():
    done = subprocess.run(
        [
            str(BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_v1_parses_the_file():
    done = subprocess.run(
        ["docker-compose", "--file", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_both_dockerfiles_are_rendered_from_one_definition():
    """The base, reqs, wheel and core stages are written once (deploy/docker/stages.Dockerfile)
    and both top-level Dockerfiles are exactly its rendering, so the second image's build
    reuses the first's (multi-GB) layers and the two cannot drift apart."""
    from deploy.images import render_dockerfile

    stages = (ROOT / "deploy" / "docker" / "stages.Dockerfile").read_text()
    for role in ("server", "client"):
        text = (ROOT / f"Dockerfile.{role}").read_text()
        assert text == render_dockerfile(role), f"Dockerfile.{role}: run fedyolo deploy images"
        assert text.count(stages) == 1 and "#@stages" not in text
        head = (ROOT / "deploy" / "docker" / f"{role}.Dockerfile").read_text()
        assert "FROM " not in head, f"{role}.Dockerfile must take its stages from stages.Dockerfile"


def test_labels_and_build_arguments_carry_no_build_time(monkeypatch):
    """Same source, same image ID: no ``created`` label, no timestamp among the build args,
    and the revision is the last commit of what the image installs (not HEAD)."""
    import deploy.images as images

    for role in ("server", "client"):
        text = (ROOT / f"Dockerfile.{role}").read_text().lower()
        assert "created" not in text and "date" not in text.replace("update", ""), role
    seen: list[list[str]] = []
    monkeypatch.setattr(images, "_run", lambda cmd, what, env=None: seen.append(cmd))
    monkeypatch.setattr(images, "image_id", lambda tag, cli=None: "")
    monkeypatch.setattr(images, "image_size", lambda tag, cli=None: 1)
    monkeypatch.setattr(images, "write_dockerfiles", lambda root=ROOT: [])
    for _ in range(2):
        images.build("client", cli="docker", platform="linux/arm64")
    assert seen[0] == seen[1]
    assert "--platform" in seen[0] and "linux/arm64" in seen[0]
    args = " ".join(seen[0])
    assert not re.search(r"20\d\d-\d\d-\d\d", args), args
    assert "fedyolo-client:" in args and args.count("-arm64") == 1


def test_the_client_image_has_no_server_dependencies():
    from deploy.images import requirements

    core = " ".join(requirements("core")).lower()
    for heavy in ("ray", "optuna", "boto3", "onnx", "clearml", "docker"):
        assert not re.search(rf"\b{heavy}\b", core), heavy
    server = " ".join(requirements("server")).lower()
    assert "ray==" in server and "clearml==" in server and "torch" not in server
    assert requirements("drop") == ["triton", "opencv-python"]
    opencv = [r for r in requirements("core") if r.startswith("opencv-python==")]
    assert requirements("headless") == [
        opencv[0].replace("opencv-python", "opencv-python-headless")
    ]


def test_the_arm64_lock_is_the_client_and_only_the_client():
    """``deploy/docker/lock-arm64.txt`` pins every package of the arm64 client: the core's pins
    (torch/torchvision: the newest CPU builds on PyPI for aarch64), nothing of the server,
    no CUDA or triton, and the headless OpenCV."""
    from deploy.images import LOCK_ARM64, requirements

    lines = [x for x in LOCK_ARM64.read_text().splitlines() if x and not x.startswith("#")]
    pins = {x.split("==")[0].lower(): x for x in lines}
    assert all("==" in x for x in lines), [x for x in lines if "==" not in x]
    for req in [*requirements("core", "arm64"), *requirements("headless")]:
        assert pins.get(req.split("==")[0].lower(), "").lower() == req.lower(), req
    assert pins["torch"] == "torch==2.10.0" and pins["torchvision"] == "torchvision==0.25.0"
    for heavy in ("ray", "optuna", "boto3", "clearml", "onnx", "docker", "triton", "hydra-core"):
        assert heavy not in pins, heavy
    assert not [n for n in pins if n.startswith(("nvidia-cu", "nvidia-cudnn", "cuda-"))]


def test_the_amd64_lock_pins_both_images_as_pyproject_does():
    """``deploy/docker/lock-amd64.txt`` holds every package of the x86_64 images, indirect ones
    included, each at one version; pyproject.toml's own pins agree with it (a pin changed in
    one place only would build images with other packages than the tests ran)."""
    from deploy.images import LOCK_AMD64, requirements

    lines = [x for x in LOCK_AMD64.read_text().splitlines() if x and not x.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", x) for x in lines), lines
    pins = {x.split("==")[0].lower().replace("_", "-"): x.split("==")[1] for x in lines}
    assert len(pins) == len(lines), "a package locked twice"
    for req in [*requirements("core"), *requirements("headless"), *requirements("server")]:
        name, want = re.split(r"\[.*\]", req.split("==")[0])[0], req.split("==")[1]
        got = pins.get(name.lower().replace("_", "-"))
        assert got == want, f"{req}: the lock has {got}"
    for indirect in ("grpcio", "protobuf", "pillow", "requests", "botocore"):
        assert indirect in pins, f"{indirect} (indirect) is not locked"
    # the images install under it (pip.sh) and so does the tested venv (Makefile)
    assert "--constraint" in (ROOT / "deploy" / "docker" / "pip.sh").read_text()
    assert "$(CONSTRAINT)" in (ROOT / "Makefile").read_text()


def test_requirements_script_pins_per_platform_in_the_image(tmp_path):
    """What the images' reqs stage runs (standard library only, inside the build)."""
    script = ROOT / "deploy" / "docker" / "requirements.py"

    def printed(role: str, arch: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, str(script), str(ROOT / "pyproject.toml"), role, arch],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.split()

    # "": the legacy builder sets no TARGETARCH
    out = {arch: printed("core", arch) for arch in ("amd64", "arm64", "")}
    assert "torch==2.10.0" in out["arm64"] and "torch==2.10.0" not in out["amd64"]
    assert out[""] == out["amd64"]
    # the core's first layer: torch's NVIDIA libraries, pinned as the lock pins them (x86_64);
    # arm64's CPU torch has none, only Ultralytics' NVML bindings
    cuda = {}
    for arch in ("amd64", "arm64"):
        cuda[arch] = printed("cuda", arch)
        lock = (ROOT / "deploy" / "docker" / f"lock-{arch}.txt").read_text().splitlines()
        assert set(cuda[arch]) <= set(lock), arch
    names = {line.split("==")[0] for line in cuda["amd64"]}
    assert {"nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-nccl-cu13", "cuda-toolkit"} <= names
    assert not any(n.startswith(("torch", "triton")) for n in names)
    assert [line.split("==")[0] for line in cuda["arm64"]] == ["nvidia-ml-py"]


def test_compose_secrets_and_data_come_from_the_environment():
    """No secret or host path is baked in: keys, certificates and shards are mounted from
    ``FEDYOLO_*`` variables; every client's data is read-only; ClearML keys pass through."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    link = compose["services"]["superlink"]
    assert "--enable-supernode-auth" in link["command"]
    assert not any("--insecure" in c for c in link["command"])
    assert link["ports"] == ["127.0.0.1:${FEDYOLO_PORT:-9092}:9092"]
    assert link["environment"]["CLEARML_API_SECRET_KEY"] == "${CLEARML_API_SECRET_KEY:-}"
    for i in (0, 1):
        node = compose["services"][f"supernode-{i}"]
        assert f"partition-id={i} " in node["command"][-1] and "data-path=" in node["command"][-1]
        assert "warm-worker=${FEDYOLO_WARM_WORKER:-true}" in node["command"][-1]
        data = [v for v in node["volumes"] if v.endswith(":/data:ro")]
        assert data == [f"${{FEDYOLO_SHARDS:-./.fedyolo/compose/shards}}/client_{i}:/data:ro"]
        assert node["depends_on"]["superlink"]["condition"] == "service_healthy"


def test_the_image_source_digest_follows_the_code_and_not_the_readme(tmp_path):
    """``engine.build=missing`` rebuilds an image whose ``io.fedyolo.source`` label differs
    from the checkout's: the digest must change with the code an image installs, only."""
    from deploy.images import SOURCE_PARTS, source_digest

    for part in SOURCE_PARTS:
        src = ROOT / part
        if src.is_file():
            shutil.copy2(src, tmp_path / part)
        else:
            shutil.copytree(src, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    first = source_digest(tmp_path)
    assert first == source_digest(ROOT)
    (tmp_path / "README.md").write_text("edited")
    (tmp_path / "fl_client" / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "fl_client" / "__pycache__" / "x.pyc").write_bytes(b"cache")
    assert source_digest(tmp_path) == first
    worker = tmp_path / "fl_client" / "worker.py"
    worker.write_text(worker.read_text() + "\n# edited\n")
    assert source_digest(tmp_path) != first


def test_the_compose_cli_never_inherits_this_interpreters_python_path(tmp_path, monkeypatch):
    """Flower's Ray backend exports this interpreter's sys.path as PYTHONPATH; Compose v1 (a
    system Python program) then imported this environment's docker SDK and failed."""
    import deploy.compose as compose

    monkeypatch.setenv("PYTHONPATH", "/somewhere/site-packages")
    monkeypatch.setattr(compose, "compose_cli", lambda: ["docker-compose"])
    c = compose.Compose(tmp_path, {"FEDYOLO_CLIENTS": "2"}, [])
    assert "PYTHONPATH" not in c.env and c.env["FEDYOLO_CLIENTS"] == "2"


def test_more_clients_are_made_from_the_first():
    from deploy.compose import client_services

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    extra = client_services(compose, 4)
    assert sorted(extra) == ["supernode-2", "supernode-3"]
    node = extra["supernode-3"]
    assert "partition-id=3 " in node["command"][-1]
    assert "warm-worker=" in node["command"][-1]
    assert any("supernodes/supernode-3:/secrets/node.key:ro" in v for v in node["volumes"])
    assert any(v.endswith("/client_3:/data:ro") for v in node["volumes"])


def test_an_exported_shard_reads_the_same_wherever_it_is_mounted(tmp_path, tiny_data):
    """Links resolved, ``data.yaml`` relative to its folder: moved elsewhere, the shard still
    lists the same images with the same labels (what a container sees at /data)."""
    from deploy.compose import export_shard
    from fl_client.data.formats import label_path_for, read_data_yaml
    from fl_server import data

    ds = data.load_dataset(tiny_data)
    part = data.partition(
        ds.samples, 2, "iid", alpha=0.5, seed=0, server_val_fraction=0.2, client_val_fraction=0.2
    )
    data.write_partition(part, list(ds.names), tmp_path / "written")
    src = tmp_path / "written" / "client_0"
    assert any(p.is_symlink() for p in src.rglob("*"))  # what the partition writes
    export_shard(src, tmp_path / "export")
    moved = Path(shutil.move(str(tmp_path / "export"), str(tmp_path / "moved")))
    spec, orig = read_data_yaml(moved / "data.yaml"), read_data_yaml(src / "data.yaml")
    for split in ("train", "val"):
        new, old = spec.images(split), orig.images(split)
        assert [p.name for p in new] == [p.name for p in old] and new
        assert all(p.read_bytes() == q.read_bytes() for p, q in zip(new, old, strict=True))
        assert all(
            label_path_for(p).read_text() == label_path_for(q).read_text()
            for p, q in zip(new, old, strict=True)
        )
    assert not any(p.is_symlink() for p in moved.rglob("*"))
    assert "path" not in yaml.safe_load((moved / "data.yaml").read_text())
