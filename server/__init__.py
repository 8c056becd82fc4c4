"""Sartiq generation service: the server package."""

import os

# grpcio 1.80+ restarts its event-engine poller inside a forked child (grpc/grpc#43055). The
# local processors start ffmpeg with subprocess, and Python's close_fds then closes that
# poller's epoll descriptor: the child can die before exec, and a video task fails at random.
# The service never forks to keep using gRPC, so gRPC's fork handlers stay off unless the
# operator sets the variable. This runs before any module here imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
