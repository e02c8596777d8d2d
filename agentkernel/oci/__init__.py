"""Helpers of the ``oci`` backend (``agentkernel.backends.oci``): containers run straight through an OCI
runtime (crun, runc or runsc) on bundles generated from the policy, with no engine daemon.

- ``rootfs``: image -> unpacked, content-addressed root filesystem in the cache (unpacked once).
- ``seccomp_oci``: the Docker-format seccomp profiles -> the OCI ``linux.seccomp`` form, and the
  precompiled BPF that crun loads directly (compiling the filter is two thirds of a cold ``crun run``).
- ``bundle``: ``ContainerPlan`` -> ``config.json`` (the one place where policy maps to the OCI config).
- ``runtime``: runtime invocations, the private mount namespace holding the overlay root, cgroups and
  the clean-up that removes everything of a sandbox from its id alone.

Standard library only; nothing here imports asyncio.
"""
