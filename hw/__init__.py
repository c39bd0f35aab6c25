"""dynacc.hw"""
