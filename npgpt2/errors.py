"""The one exception type users see.

Anything wrong with the user's input (a file, a flag, a folder) raises `Npgpt2Error` whose
message is one line naming the file or flag and what was wrong. The CLI prints it as
`npgpt2: error: <message>` and exits with status 2, never with a traceback.
"""


class Npgpt2Error(Exception):
    """A user-facing error: str(e) is one line naming the file/flag and the problem."""
