"""The compose engine without a Docker engine: the inputs it stages into the SuperLink
container, the one line a container's failure becomes, and the hardening of docker-compose.yml
as compose renders it (v1 ``docker-compose config``, when installed)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from deploy import compose as c
from deploy.health import main as health_main
from fl_server import config as config_mod

ROOT = Path(__file__).resolve().parents[2]


def _run_dir(tmp_path: Path, **cfg) -> Path:
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    base = OmegaConf.create(
        {
            "model": {"cfg": "fedyolo-tiny.yaml"},
            "distill": {"teacher": None},
            "data": {"path": None},
        }
    )
    for key, value in cfg.items():
        OmegaConf.update(base, key, value)
    OmegaConf.save(base, run / "config.yaml")
    return run


def _env(run: Path) -> dict[str, str]:
    return c.mount_environment(run)


def test_a_checkpoint_given_relative_is_mounted_read_only_at_its_absolute_path(
    tmp_path, monkeypatch
):
    ckpt = tmp_path / "elsewhere" / "best.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    run = _run_dir(tmp_path, **{"model.cfg": "elsewhere/best.pt"})
    cfg = config_mod.load(run / "config.yaml")
    override = c.stage_inputs(run, cfg, [c.COMPOSE_FILE], _env(run))
    assert override["services"]["superlink"]["volumes"] == [
        {"type": "bind", "source": str(ckpt), "target": str(ckpt), "read_only": True}
    ]
    # the ServerApp in the container reads config.yaml: the path there is the absolute one
    assert config_mod.load(run / "config.yaml").model.cfg == str(ckpt)
    # and the rendered SuperLink sees the file there, read-only
    (run / "compose").mkdir()
    (run / "compose" / "inputs.yml").write_text(yaml.safe_dump(override))
    mounts = c.service_mounts("superlink", _env(run), [c.COMPOSE_FILE, run / "compose/inputs.yml"])
    assert c.visible_at(ckpt, mounts) == str(ckpt)
    assert next(m for m in mounts if m.target == str(ckpt)).read_only


def test_a_shipped_model_yaml_and_a_file_inside_the_run_need_no_mount(tmp_path):
    run = _run_dir(tmp_path)
    assert c.stage_inputs(run, config_mod.load(run / "config.yaml"), [c.COMPOSE_FILE],
                          _env(run)) == {}  # fmt: skip
    (run / "best.pt").write_bytes(b"w")  # resume from the run's own checkpoint, say
    OmegaConf.save(OmegaConf.create({"model": {"cfg": str(run / "best.pt")}}), run / "config.yaml")
    assert c.stage_inputs(run, config_mod.load(run / "config.yaml"), [c.COMPOSE_FILE],
                          _env(run)) == {}  # fmt: skip


@pytest.mark.parametrize(
    "key, value",
    [("model.cfg", "gone/best.pt"), ("distill.teacher", "gone/t.pt"), ("data.path", "gone/")],
)
def test_a_missing_input_is_one_line_naming_key_and_path_before_any_container(tmp_path, key, value):
    run = _run_dir(tmp_path, **{key: str(tmp_path / value)})
    with pytest.raises(c.ComposeError) as err:
        c.stage_inputs(run, config_mod.load(run / "config.yaml"), [c.COMPOSE_FILE], _env(run))
    msg = str(err.value)
    assert msg.startswith(f"{key}={tmp_path / value}") and "\n" not in msg, msg


def test_the_host_check_refuses_a_missing_checkpoint_with_exit_2():
    """``fedyolo run`` composes and validates the config before preparing anything."""
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.compose(["engine=compose", "model.cfg=/nonexistent/best.pt"])
    assert "model.cfg" in str(err.value) and "/nonexistent/best.pt" in str(err.value)
    assert int(err.value.exit_code) == 2


def test_a_container_failure_is_its_reason_in_one_line(tmp_path):
    run = tmp_path / "run"
    logs = run / "logs"
    logs.mkdir(parents=True)
    assert c.failure_reason(run, logs) is None
    (logs / "superlink.log").write_text(
        "superlink_1  | 2026-12-04T10:00:00.1Z INFO :      Starting Flower ServerApp\n"
        "superlink_1  | 2026-12-04T10:00:01.2Z Traceback (most recent call last):\n"
        'superlink_1  | 2026-12-04T10:00:01.2Z   File "/opt/venv/x.py", line 3, in <module>\n'
        "superlink_1  | 2026-12-04T10:00:01.3Z fl_client.model.ModelConfigError: model.cfg: "
        "checkpoint '/h/best.pt' not found (nothing is downloaded; give a local path)\n"
        "superlink_1  | 2026-12-04T10:00:01.4Z ERROR :     Exit Code: 201\n"
    )
    why = c.failure_reason(run, logs)
    assert why.startswith("fl_client.model.ModelConfigError: model.cfg: checkpoint '/h/best.pt'")
    # the ServerApp's own reason in summary.json wins
    (run / "summary.json").write_text(json.dumps({"status": "failed", "reason": "disk full"}))
    assert c.failure_reason(run, logs) == "disk full"


def _rendered(tmp_path: Path) -> dict:
    env = {
        **c.mount_environment(tmp_path),
        "FEDYOLO_CLIENT_MEMORY": "3g",
        "FEDYOLO_SERVER_CPUS": "1.5",
    }
    envf = tmp_path / "compose.env"
    envf.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    done = subprocess.run(
        ["docker-compose", "--env-file", str(envf), "--file", str(c.COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_every_service_is_hardened_as_compose_v1_renders_it(tmp_path):
    services = _rendered(tmp_path)["services"]
    assert set(services) == {"superlink", "supernode-0", "supernode-1"}  # no ClearML here
    for name, s in services.items():
        assert s["read_only"] is True and s["security_opt"] == ["no-new-privileges:true"], name
        assert {"/tmp", "/home/fedyolo"} <= set(s["tmpfs"]), name
        assert s.get("mem_limit") and s.get("pids_limit") and s.get("cpus"), name
        assert s["user"] != "0:0"
    link = services["superlink"]
    # numbers where Docker's API takes numbers (v1 passes a string on and fails at `up`)
    assert all(isinstance(s["pids_limit"], int) for s in services.values())
    assert float(link["cpus"]) == 1.5
    client = services["supernode-0"]
    assert str(client["mem_limit"]).lower() in ("3g", str(3 * 1024**3))
    test = client["healthcheck"]["test"]
    assert test[-2:] == ["deploy.health", "--supernode"], test
    # what that check reads from the SuperNode's command line: the TLS link it must verify
    from deploy.health import supernode_args

    sn = supernode_args(["flower-supernode", *client["command"]])
    assert sn is not None and (sn.superlink, sn.root_ca) == ("superlink:9092", "/secrets/ca.crt")
    assert "clearml" not in json.dumps(_rendered(tmp_path).get("volumes") or {})


def test_the_clients_made_past_two_keep_the_hardening():
    compose = yaml.safe_load(c.COMPOSE_FILE.read_text())
    extra = c.client_services(compose, 4)
    assert set(extra) == {"supernode-2", "supernode-3"}
    for s in extra.values():
        assert s["read_only"] is True and "no-new-privileges:true" in s["security_opt"]
        assert "/client_3:" in json.dumps(extra["supernode-3"]["volumes"])


def test_health_check_needs_the_tls_link(tmp_path, capsys):
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert health_main([f"127.0.0.1:{port}"]) == 0
        # a port that answers but speaks no TLS (a real CA): unhealthy, one line saying so
        from deploy.certs import make_tls

        ca = str(make_tls(tmp_path / "tls", ["127.0.0.1"]).ca_cert)
        assert health_main([f"127.0.0.1:{port}", "--tls", f"127.0.0.1:{port}", "--ca", ca]) == 1
    assert "no TLS link to the SuperLink" in capsys.readouterr().err


def test_the_clearml_services_are_in_their_own_file():
    main = yaml.safe_load(c.COMPOSE_FILE.read_text())
    clearml = yaml.safe_load((ROOT / "docker-compose.clearml.yml").read_text())
    assert not [s for s in main["services"] if s.startswith("clearml")]
    assert set(main["volumes"]) == {"superlink-state"} and set(main["networks"]) == {"federation"}
    assert len(clearml["volumes"]) == 6 and "clearml-apiserver" in clearml["services"]


def test_compose_down_of_a_directory_that_is_no_compose_run_is_one_line(tmp_path):
    with pytest.raises(c.ComposeError, match=r"no compose.env \(not a run of engine=compose\)"):
        c.down(tmp_path)


def test_fedyolo_deploy_down_of_a_directory_that_is_no_compose_run_is_one_line(tmp_path, capsys):
    from fl_server.cli import main

    assert main(["deploy", "down", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no compose.env (not a run of engine=compose)" in err, err


def test_cpu_limits_above_this_machines_cores_are_lowered(monkeypatch):
    monkeypatch.setattr(c.os, "cpu_count", lambda: 2)
    assert c._cpus(8.0, "server_cpus") == 2.0 and c._cpus(0.5, "client_cpus") == 0.5


def test_an_image_of_another_platform_is_never_run_as_the_client(tmp_path):
    """``engine.client_platform``: an existing ``client_image`` built for another platform is
    rebuilt (``build=missing``) or refused in one line (``build=never``), never run as it is.
    Needs a Docker engine (a two-file image built from scratch, nothing pulled)."""
    import os

    from deploy import images

    try:
        cli = images.docker_cli()
        ok = subprocess.run([cli, "info"], capture_output=True, check=False).returncode == 0
    except images.ImageError:
        ok = False
    if not ok:
        if os.environ.get("FEDYOLO_REQUIRE_DOCKER") == "1":
            pytest.fail("a Docker engine is required here")
        pytest.skip("no Docker engine")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY hello /hello\n")
    (ctx / "hello").write_text("hello")
    tag = "fedyolo-test/platform:1"
    subprocess.run([cli, "build", "-q", "-t", tag, str(ctx)], check=True, capture_output=True)
    try:
        import platform

        native = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine()]
        other = "arm64" if native == "amd64" else "amd64"
        assert images.image_arch(tag, cli) == native
        why = images.outdated({"server": tag, "client": tag}, cli, {"client": f"linux/{other}"})
        assert why["client"] == f"built for linux/{native}, not linux/{other}"
        e = OmegaConf.create(
            {"server_image": tag, "client_image": tag, "build": "never",
             "client_platform": f"linux/{other}", "offline": True, "base_image": ""}
        )  # fmt: skip
        with pytest.raises(c.ComposeError) as err:
            c.ensure_images(e)
        assert str(err.value) == (
            f"engine.build=never but {tag} is linux/{native}, not linux/{other} "
            f"(engine.client_platform=linux/{other})"
        )
    finally:
        subprocess.run([cli, "rmi", "-f", tag], capture_output=True, check=False)


def test_down_of_a_run_directory_from_someone_else_reads_only_its_fedyolo_values(
    tmp_path, monkeypatch
):
    """``fedyolo deploy down RUN``: a hostile ``compose.env`` cannot choose the compose CLI's
    PATH, Docker daemon or compose files, and the run's override files are not read."""
    import os

    run = tmp_path / "runs" / "handed-over"
    (run / "compose").mkdir(parents=True)
    (run / "compose.env").write_text(
        "FEDYOLO_CLIENTS=3\nPATH=/tmp/evil/bin\nDOCKER_HOST=tcp://203.0.113.9:2375\n"
        "COMPOSE_FILE=/tmp/evil.yml\nLD_PRELOAD=/tmp/evil.so\n"
    )
    (run / "compose" / "compose.clients.yml").write_text("volumes: {x: {name: someone_elses}}\n")
    seen = {}

    def fake_call(self, *args, timeout=600, check=True):
        seen.update(args=args, env=self.env, files=self.files, check=check,
                    env_file=self.env_file.read_text())  # fmt: skip
        return ""

    monkeypatch.setattr(c, "compose_cli", lambda: ["docker-compose"])
    monkeypatch.setattr(c.Compose, "__call__", fake_call)
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    assert c.down(run) == c.project_name(run.resolve())
    assert seen["args"][0] == "down" and seen["check"] is True
    assert seen["files"] == [c.COMPOSE_FILE]
    assert seen["env_file"] == "FEDYOLO_CLIENTS=3\n"
    assert seen["env"].get("PATH") == os.environ.get("PATH")
    assert "DOCKER_HOST" not in seen["env"] and "LD_PRELOAD" not in seen["env"]
    assert "COMPOSE_FILE" not in seen["env"]


def test_a_run_is_resumed_after_a_superlink_restart_only_while_it_is_under_way(tmp_path):
    """``submit_and_follow`` resubmits a run whose ``flwr run`` ended mid-run: one whose
    summary says ``running``, or one with no summary yet but a resumable state (the SuperLink
    killed between round 1's record and its summary). A run that never started (no state) or
    has ended is not resubmitted."""
    from fl_server.records import Status
    from fl_server.run_dir import RunDir

    run = RunDir(tmp_path)
    assert not c._under_way(tmp_path)  # flwr run failed before any ServerApp started
    run.state.write_bytes(b"state")
    assert c._under_way(tmp_path)  # round 0's state saved, no summary yet
    for status, under_way in [(Status.RUNNING, True), (Status.COMPLETED, False),
                              (Status.FAILED, False)]:  # fmt: skip
        run.summary.write_text(json.dumps({"status": status}))
        assert c._under_way(tmp_path) is under_way, status
