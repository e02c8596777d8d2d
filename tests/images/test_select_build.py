"""Image selection (command, project files, registry reachability, --explain) and Dockerfile builds."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import docker_ok, oci_refs


def test_explain_by_command_and_project_files(registry, env):
    reg = registry.host
    r = env.ak("run", "--explain", "--", "python3", "-V", AGENTKERNEL_REGISTRY=reg)
    assert r.returncode == 0, r.stderr
    assert f"image: {reg}/library/python:3.12-alpine" in r.stdout
    assert "command 'python3'" in r.stdout and "fallback: agentkernel/debian" in r.stdout
    for cmd, image in (("npm", "node:22-alpine"), ("cargo", "rust:1.85-alpine"), ("go", "golang:1.23-alpine"),
                       ("gem", "ruby:3.3-alpine"), ("bash", "agentkernel/debian")):
        r = env.ak("run", "--explain", "--", cmd)
        assert f"image: {image}" in r.stdout, (cmd, r.stdout)
    proj = os.path.join(env.root, "proj")
    os.makedirs(proj)
    for fname, image in (("go.mod", "golang:1.23-alpine"), ("package.json", "node:22-alpine")):
        open(os.path.join(proj, fname), "w").close()
        r = env.ak("run", "--explain", "--mount-cwd", "--", "ls", cwd=proj)
        assert f"image: {image}" in r.stdout and f"project file '{fname}'" in r.stdout, r.stdout
        r = env.ak("run", "--explain", "--", "ls", cwd=proj)  # not mounted: project files do not count
        assert "image: agentkernel/busybox" in r.stdout and "no runtime detected" in r.stdout, r.stdout
        r = env.ak("run", "--explain", "--", "ls", cwd=proj, AGENTKERNEL_REGISTRY=registry.host)
        assert f"image: {registry.host}/library/alpine:3.20" in r.stdout, r.stdout  # configured: the public one
        os.unlink(os.path.join(proj, fname))
    r = env.ak("run", "--explain", "-B", "podman", "-i", "agentkernel/busybox", "--", "python3")
    assert "why: explicit (--image)" in r.stdout and "present in podman: yes" in r.stdout


def test_public_image_pulled_when_registry_configured(registry, env):
    """`sh` -> the reference's alpine:3.20, from the configured registry (our loopback one)."""
    env.login(registry)
    image = f"{registry.host}/library/alpine:3.20"
    env.track(image)
    r = env.ak("run", "-B", "oci", "--", "sh", "-c", "echo selected", AGENTKERNEL_REGISTRY=registry.host)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "selected\n"
    assert image in oci_refs(env.cache)


def test_local_fallback_when_registry_unreachable(env):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: connection refused
    try:
        r = env.ak("run", "-B", "oci", "--", "sh", "-c", "echo fallback", AGENTKERNEL_REGISTRY=dead)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "fallback\n"
        r = env.ak("run", "--explain", "-B", "oci", "--", "sh", AGENTKERNEL_REGISTRY=dead)
        assert "image: agentkernel/busybox" in r.stdout and "unreachable" in r.stdout, r.stdout
        r = env.ak("run", "--explain", "-B", "oci", "--pull", "never", "--", "python3", AGENTKERNEL_REGISTRY=dead)
        assert "image: agentkernel/debian" in r.stdout and "'never'" in r.stdout, r.stdout
    finally:
        s.close()


DOCKERFILE = """FROM agentkernel/busybox
ARG GREETING=hello
RUN echo "$GREETING from the build" > /greeting
"""


@pytest.mark.parametrize("backend", ["podman", "docker", "oci"])
def test_build_from_dockerfile_cached_by_content(env, backend):
    if backend == "docker" and not docker_ok():
        pytest.fail("dockerd is not running") if os.environ.get("CI") == "true" else pytest.skip("no dockerd")
    ctx = os.path.join(env.root, f"proj-{backend}")
    os.makedirs(ctx)
    with open(os.path.join(ctx, "Dockerfile"), "w") as f:
        f.write(DOCKERFILE)
    r = env.ak("images", "build", "-B", backend, "--build-arg", f"GREETING=hi-{backend}", ctx, timeout=300)
    assert r.returncode == 0, r.stderr
    tag = r.stdout.strip()
    assert tag.startswith(f"agentkernel-build/proj-{backend}:")
    env.track(tag)
    r2 = env.ak("images", "build", "-B", backend, "--build-arg", f"GREETING=hi-{backend}", ctx)
    assert r2.returncode == 0 and r2.stdout.strip() == tag  # same content: the same image, no rebuild
    r = env.ak("run", "-B", backend, "-i", tag, "--", "cat", "/greeting")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"hi-{backend} from the build\n"
    with open(os.path.join(ctx, "extra.txt"), "w") as f:
        f.write("changes the context")
    r3 = env.ak("images", "build", "-B", backend, "--build-arg", f"GREETING=hi-{backend}", ctx, timeout=300)
    assert r3.returncode == 0 and r3.stdout.strip() != tag
    env.track(r3.stdout.strip())


def test_run_builds_from_config_build_table(env):
    proj = os.path.join(env.root, "cfgproj")
    os.makedirs(os.path.join(proj, "docker"))
    with open(os.path.join(proj, "docker", "Containerfile"), "w") as f:
        f.write("FROM agentkernel/busybox AS base\nRUN echo base > /stage\n"
                "FROM base AS final\nARG WHO\nRUN echo \"final $WHO\" > /stage\n")
    with open(os.path.join(proj, "agentkernel.toml"), "w") as f:
        f.write('[build]\ndockerfile = "docker/Containerfile"\ncontext = "docker"\ntarget = "base"\n'
                'args = { WHO = "x" }\n')
    r = env.ak("run", "--explain", "--", "cat", "/stage", cwd=proj)
    assert "built from the [build] table" in r.stdout, r.stdout
    tag = r.stdout.split("image: ")[1].split()[0]
    env.track(tag)
    r = env.ak("run", "--", "cat", "/stage", cwd=proj, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "base\n"  # target = "base"
    assert subprocess.run(["podman", "image", "exists", tag]).returncode == 0


def test_agent_dockerfiles_present_and_parameterised():
    from agentkernel.commands.images import AGENTS_DIR

    assert sorted(os.listdir(AGENTS_DIR)) == ["claude-code", "codex", "gemini", "opencode"]
    for name in os.listdir(AGENTS_DIR):
        with open(os.path.join(AGENTS_DIR, name, "Dockerfile")) as f:
            text = f.read()
        assert "ARG BASE=" in text and "FROM ${BASE}" in text and "npm install -g" in text


@pytest.mark.parametrize("store_backend", ["oci", "podman"])
def test_a_selection_that_says_present_is_present(store_backend):
    """``choose_image`` skips its second presence check when ``select`` already found the image: the flag
    must never claim an image the store does not have (checked against ``present`` for every runtime)."""
    from agentkernel.images.pull import present, store_of
    from agentkernel.imagesel import RUNTIMES, choose_image, select

    store = store_of(store_backend)
    seen = 0
    for rt in RUNTIMES:
        for policy in ("missing", "never"):
            argv = [rt.commands[0]] if rt.commands else ["true"]
            sel = select(store_backend, argv, policy=policy)
            if sel.present:
                seen += 1
                assert present(store, sel.image), (rt.name, policy, sel.image)
                assert choose_image(store_backend, argv, policy=policy) == sel.image
    assert seen, "agentkernel's local images are present (setup.sh): some selection found its image"
