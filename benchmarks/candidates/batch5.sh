run() { /work/main/.venv/bin/python benchmarks/candidates/proto.py "$1" "$2"; }
run rankK8-l8-clip1 '{"comp": "rankK", "K": 8, "lam0": 8.0, "power": 0}'
run rankK32-l8-clip1 '{"comp": "rankK", "K": 32, "lam0": 8.0, "power": 0}'
run rankK32-l8-noclip '{"comp": "rankK", "K": 32, "lam0": 8.0, "power": 0, "clip": 0}'
run rankK32-l8-clip4 '{"comp": "rankK", "K": 32, "lam0": 8.0, "power": 0, "clip": 4}'
run rankK64-l8-clip1 '{"comp": "rankK", "K": 64, "lam0": 8.0, "power": 0}'
