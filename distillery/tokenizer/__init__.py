"""distillery.tokenizer"""
