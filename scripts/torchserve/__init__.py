"""TorchServe as this project runs and calls it, one module per concern.

- profile: the config profiles (PROFILES, PROFILE_CHANGES), Ports and render_profile, and the
  loopback ports a server may take (free_ports, check_ports_free).
- runtime: how TorchServe is started and stopped: NativeRuntime (the venv's, with Java 17),
  ComposeRuntime (the serving image under compose), launch_native, choose_runtime,
  active_runtime and the run folder (RUN_DIR), shut_down.
- readiness: the one readiness rule (Readiness, wait_until_ready) and the waits before it
  (wait_until, wait_for_token, wait_for_ping, accepts_calls).
- client: the one HTTP client for the inference and management APIs (TorchServeClient, Reply),
  its keys read from key_file.json (read_token, KeyFileAuth); every TorchServe URL is built
  there.
- running: the record of the local server that is running (servers/<runtime>.json), which
  `make token`, the curl lines, the `mmekit` client and `make ui` read.

profile and client import neither torch nor the archive and weights tools: the `mmekit`
client and the emulator use them without those. ServeError, defined here, is what each module
raises for the user to fix.
"""

from .. import PROJECT_ROOT

# The run folder of `make serve-local` (key_file.json, logs/, config, servers/); `make dev`
# runs in its dev/.
RUN_DIR = PROJECT_ROOT / ".mmekit"


class ServeError(Exception):
    """Something the user has to fix; printed as one line."""
