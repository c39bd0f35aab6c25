"""dynacc.sw"""
