run() { /work/main/.venv/bin/python benchmarks/candidates/proto.py "$1" "$2"; }
run rankK32-l4 '{"comp": "rankK", "K": 32, "lam0": 4.0, "power": 0, "clip": 0}'
run rankK32-l16 '{"comp": "rankK", "K": 32, "lam0": 16.0, "power": 0, "clip": 0}'
run rankK64-l8 '{"comp": "rankK", "K": 64, "lam0": 8.0, "power": 0, "clip": 0}'
run rankK128-l8 '{"comp": "rankK", "K": 128, "lam0": 8.0, "power": 0, "clip": 0}'
run rankK16-l8 '{"comp": "rankK", "K": 16, "lam0": 8.0, "power": 0, "clip": 0}'
