"""The REST service (`imgsearch serve`): a FastAPI shell over the core functions in `imgsearch`, and its web page.

Nothing here is imported by the CLI except `serve`.
"""
