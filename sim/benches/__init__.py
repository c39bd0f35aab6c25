"""dynacc.sim.benches"""
