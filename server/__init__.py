"""Sartiq generation service: the server package."""

import os

# grpcio 1.80+ restarts its event-engine poller inside a forked child (grpc/grpc#43055). The
# local processors start ffmpeg with subprocess, and Python's close_fds then closes that
# poller's epoll descriptor: the child can die before exec, and a video task fails at random.
# The service never forks to keep using gRPC, so gRPC's fork handlers stay off unless the
# operator sets the variable. This runs before any module here imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

# C-core's tracers (GRPC_TRACE=api, http, all, ...) print every call's metadata, bearer
# tokens included, to stderr, where no logging filter reaches (server/logs.py cleans the
# records of grpc's Python layer). grpc reads these variables once, when it loads, so they
# are settled here: no tracer, and core logs errors only, which carry no metadata values.
# SARTIQ_GRPC_CORE_DEBUG=1 leaves both as set, for debugging grpc itself: credentials
# may then reach stderr, and the server says so when it starts.
if os.environ.get("SARTIQ_GRPC_CORE_DEBUG") != "1":
    os.environ.pop("GRPC_TRACE", None)
    os.environ["GRPC_VERBOSITY"] = "ERROR"
