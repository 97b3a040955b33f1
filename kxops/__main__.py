"""``python -m kxops``: print versions, build facts and the backend of each op."""

from kxops._info import format_info, info

print(format_info(info()))
