"""llmforge.align"""
