"""MicroVM support shared by the ``qemu`` and ``firecracker`` backends: the hardware-KVM probe
(``kvmprobe``), offline guest images (``guestimage``: kernel, initramfs with the agent as init, ext4 root
from a local OCI image), a QMP client (``qmp``) and the newc cpio writer (``cpio``)."""
