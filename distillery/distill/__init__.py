"""distillery.distill"""
