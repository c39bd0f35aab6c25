"""dynacc.gen"""
