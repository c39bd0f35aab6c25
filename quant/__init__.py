"""dynacc.quant"""
