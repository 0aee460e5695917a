"""llmforge.serve"""
