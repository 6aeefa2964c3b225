run() { /work/main/.venv/bin/python benchmarks/candidates/proto.py "$1" "$2"; }
run diagms-l8 '{"comp": "diagms", "lam0": 8.0, "power": 0, "clip": 0}'
run diagms-l8-clip1 '{"comp": "diagms", "lam0": 8.0, "power": 0, "clip": 1}'
run rankK256-l8 '{"comp": "rankK", "K": 256, "lam0": 8.0, "power": 0, "clip": 0}'
run rankK128-l6 '{"comp": "rankK", "K": 128, "lam0": 6.0, "power": 0, "clip": 0}'
run rankK128-l12 '{"comp": "rankK", "K": 128, "lam0": 12.0, "power": 0, "clip": 0}'
run rankK128-l8-la0.25 '{"comp": "rankK", "K": 128, "lam0": 8.0, "power": 0, "clip": 0, "lookahead": 0.25}'
run rankK128-l8-negmom0.2 '{"comp": "rankK", "K": 128, "lam0": 8.0, "power": 0, "clip": 0, "momentum": -0.2}'
