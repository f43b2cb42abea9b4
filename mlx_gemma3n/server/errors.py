"""OpenAI-style error responses: every failure a client can cause becomes one of these."""

from starlette.responses import JSONResponse

_TYPES = {401: "authentication_error", 404: "not_found_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request the server refuses, with the HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str, param: str = None, code: str = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def invalid(message: str, param: str = None) -> APIError:
    """422: well-formed JSON whose fields do not fit the request schema."""
    return APIError(422, message, param)


def bad_request(message: str, param: str = None, code: str = None) -> APIError:
    """400: a request that cannot be served as sent (undecodable media, too long, ...)."""
    return APIError(400, message, param, code)


def model_not_found(name, served: str) -> APIError:
    return APIError(404, f"model {name!r} not found; this server serves {served!r}", "model", "model_not_found")
