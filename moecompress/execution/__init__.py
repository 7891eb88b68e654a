"""One execution model per deployment, shared by the placement stage and the runtime (routing policy, counters,
replay, time model). Imports only moecompress.artifacts, moecompress.format, moecompress.errors, torch and numpy."""
