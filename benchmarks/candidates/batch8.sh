run() { /work/main/.venv/bin/python benchmarks/candidates/proto.py "$1" "$2"; }
run rankK128-l8-cent '{"comp": "rankK", "K": 128, "lam0": 8.0, "power": 0, "clip": 0, "centered": 1}'
run rankK128-l12-cent '{"comp": "rankK", "K": 128, "lam0": 12.0, "power": 0, "clip": 0, "centered": 1}'
run rankK128-l16 '{"comp": "rankK", "K": 128, "lam0": 16.0, "power": 0, "clip": 0}'
run rankK128-l12-la0.25 '{"comp": "rankK", "K": 128, "lam0": 12.0, "power": 0, "clip": 0, "lookahead": 0.25}'
run rankK64-l12 '{"comp": "rankK", "K": 64, "lam0": 12.0, "power": 0, "clip": 0}'
