"""distillery.pipelines"""
