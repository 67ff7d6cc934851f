"""distillery.evaluate"""
