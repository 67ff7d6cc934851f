"""distillery.generation"""
