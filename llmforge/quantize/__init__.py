"""llmforge.quantize"""
