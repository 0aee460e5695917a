"""llmforge.data"""
