"""dynacc.sim"""
