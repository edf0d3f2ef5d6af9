"""blockdev"""
