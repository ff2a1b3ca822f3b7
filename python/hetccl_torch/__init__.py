"""hetccl as a ``torch.distributed`` backend.

    import hetccl_torch  # registers "hetccl"
    torch.distributed.init_process_group(backend="hetccl")

CPU tensors: all_reduce (sum, avg, product, min, max), broadcast, reduce, all_gather,
all_gather_into_tensor, reduce_scatter_tensor, barrier, send/recv/isend/irecv and
batch_isend_irecv (with tags), the coalescing manager, all_to_all_single, all_to_all.
Every call returns at once. Collectives run on one backend thread per process group, in
the order issued; sends and receives each progress on their own, as with Gloo (a ring
of ``irecv``/``isend`` posted in any order completes), and match by (peer, tag): every
ordered pair of ranks has a two-rank hetccl communicator of its own for them, made with
the process group. ``wait()`` raises hetccl's error as
``torch.distributed.DistBackendError``.

Rendezvous: rank 0 of each process group makes a hetccl unique id; the job key never
travels through PyTorch's store (which is not authenticated).

- every rank of the group on one host (same ``HETCCL_NODE_ID``, else hostname and boot
  id) and no ``HETCCL_JOB_KEY``: rank 0 writes the id, key included, to a file of mode
  0600 in ``/dev/shm/hetccl-torch-<uid>`` (mode 0700, this user's, else refused); the
  store carries only the file's name; rank 0 removes the file once every rank has joined;
- otherwise ``HETCCL_JOB_KEY`` (the same secret on every rank) is required: the store
  carries an id without a key, and each rank proves the key from its own environment.

Timeout: the process group's ``timeout`` (``init_process_group(..., timeout=...)``,
``new_group``) is hetccl's ``HETCCL_TIMEOUT`` for it: a call that waits longer than that
for a peer fails with hetccl's message naming the peer. ``HETCCL_TIMEOUT`` in the
environment applies where the program left torch's default (30 minutes); a
``HETCCL_TIMEOUT`` in ``Options.settings`` wins over both.
``torch.distributed.set_timeout(timeout, group)`` changes it for the calls issued after
it (hetcclCommSetTimeout), sends and receives included.

Per process group options: ``pg_options=hetccl_torch.Options(compress="all",
compress_format="bf16")`` (``HETCCL_COMPRESS`` semantics: f32 sums and averages travel
as 16-bit values), or any ``HETCCL_*`` setting in ``settings``; the rest comes from the
``HETCCL_*`` environment as for every hetccl program.
"""

import os
import secrets
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from ._build import find_library, load_extension

__all__ = ["Options", "find_library"]

_ext = load_extension()


@dataclass
class Options:
    """hetccl settings of one process group (``pg_options`` of ``init_process_group`` /
    ``new_group``); they take precedence over the environment."""

    compress: str = None  # "off" | "inter" | "all", as HETCCL_COMPRESS
    compress_format: str = None  # "fp16" | "bf16", as HETCCL_COMPRESS_FORMAT
    settings: dict = field(default_factory=dict)  # other HETCCL_* settings

    def as_dict(self):
        s = dict(self.settings)
        if self.compress is not None:
            s["HETCCL_COMPRESS"] = self.compress
        if self.compress_format is not None:
            s["HETCCL_COMPRESS_FORMAT"] = self.compress_format
        return s


def _settings_text(settings):
    for k, v in settings.items():
        if "\n" in f"{k}{v}" or "=" in k:
            raise ValueError(f"hetccl_torch.Options: bad setting {k!r}={v!r}")
    return "\n".join(f"{k}={v}" for k, v in settings.items())


# hetccl's accepted HETCCL_TIMEOUT range (src/config.rs): a longer torch timeout is
# as good as none, so it is cut to the longest hetccl takes.
_MIN_TIMEOUT_S, _MAX_TIMEOUT_S = 0.001, 7 * 24 * 3600.0


def _timeout_setting(settings, timeout):
    """HETCCL_TIMEOUT from the process group's ``timeout`` (init_process_group,
    new_group), unless pg_options name it, or the program left torch's default and the
    environment sets HETCCL_TIMEOUT: an explicit argument wins over the environment."""
    if "HETCCL_TIMEOUT" in settings or timeout is None:
        return settings
    if timeout == default_pg_timeout and os.environ.get("HETCCL_TIMEOUT"):
        return settings
    secs = min(max(timeout.total_seconds(), _MIN_TIMEOUT_S), _MAX_TIMEOUT_S)
    return {**settings, "HETCCL_TIMEOUT": repr(secs)}


def _host_identity():
    """What tells ranks of one host apart from others, as hetccl groups ranks into nodes."""
    if os.environ.get("HETCCL_NODE_ID"):
        return "node:" + os.environ["HETCCL_NODE_ID"]
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _private_dir():
    d = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
    d = d / f"hetccl-torch-{os.getuid()}"
    try:
        d.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeError(
            f"hetccl backend: {d} must be a directory of this user (uid {os.getuid()}) "
            f"closed to others (mode 0700); it is mode {stat.S_IMODE(st.st_mode):o}, "
            f"uid {st.st_uid}. Remove it, or set HETCCL_JOB_KEY"
        )
    return d


def _write_private(data):
    path = _private_dir() / f"id-{secrets.token_hex(16)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _read_private(path):
    path = Path(path)
    if path.parent != _private_dir():
        raise RuntimeError(f"hetccl backend: the id file {path} is not in {_private_dir()}")
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeError(f"hetccl backend: {path} must be this user's file of mode 0600")
    return path.read_bytes()


def _p2p_host(one_host):
    """Where this rank's point-to-point channels listen: loopback when the whole group
    is on this host, else the address this host reaches MASTER_ADDR from."""
    if one_host:
        return "127.0.0.1"
    master = os.environ.get("MASTER_ADDR")
    if not master:
        raise RuntimeError(
            "hetccl backend: ranks of this process group run on several hosts and "
            "MASTER_ADDR is not set; it names the host whose route gives each rank's "
            "address for point-to-point channels"
        )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        # No packet is sent: connect() on UDP only picks the route and source address.
        s.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))
        return s.getsockname()[0]


def _create(opts, backend_options):
    store, rank, size = opts.store, opts.group_rank, opts.group_size
    if backend_options is not None and not isinstance(backend_options, Options):
        raise TypeError(
            "hetccl backend: pg_options must be hetccl_torch.Options, not "
            f"{type(backend_options).__name__}"
        )
    settings = backend_options.as_dict() if backend_options is not None else {}
    settings = _settings_text(_timeout_setting(settings, getattr(opts, "timeout", None)))
    key_env = bool(os.environ.get("HETCCL_JOB_KEY"))

    store.set(f"hetccl/host/{rank}", _host_identity())
    hosts = [store.get(f"hetccl/host/{r}").decode() for r in range(size)]
    one_host = len(set(hosts)) == 1
    if not one_host and not key_env:
        # Every rank sees the same hosts and raises the same error: nobody waits.
        raise RuntimeError(
            f"hetccl backend: ranks of this process group run on {len(set(hosts))} hosts "
            "and HETCCL_JOB_KEY is not set; set it to the same secret on every rank "
            "(export HETCCL_JOB_KEY=$(openssl rand -hex 32)): hetccl's key never travels "
            "through PyTorch's store"
        )
    id_file = None
    if rank == 0:
        if one_host and not key_env:
            uid = _ext.unique_id("127.0.0.1", 0, False)
            id_file = _write_private(uid)
            store.set("hetccl/id_file", str(id_file))
        else:
            uid = _ext.unique_id("127.0.0.1" if one_host else None, 0, True)
            store.set("hetccl/id", uid)
    elif one_host and not key_env:
        uid = _read_private(store.get("hetccl/id_file").decode())
    else:
        uid = store.get("hetccl/id")
    try:
        return _ext.BackendHetccl(rank, size, uid, settings, _p2p_host(one_host),
                                  key_env)
    finally:
        if id_file is not None:
            id_file.unlink(missing_ok=True)


dist.Backend.register_backend("hetccl", _create, extended_api=True, devices=["cpu", "cuda"])
