"""distillery.serve"""
