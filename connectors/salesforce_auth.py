"""Logging in to Salesforce with simple-salesforce: which method the options select, and the HTTP session.

Methods (chosen by the options present; secrets come from `${ENV}` in the mapping or a secret store):
- session id + instance URL (`session_id`, `instance_url`)
- username + password + security token (`username`, `password`, `security_token`, optional `domain`)
- OAuth 2.0 JWT bearer (`username`, `consumer_key`, `private_key_file`, optional `domain`)
- OAuth 2.0 client credentials (`consumer_key`, `consumer_secret`, `domain` = the org's My Domain)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceAuthenticationFailed

from crmbridge.errors import TargetError

DEFAULT_API_VERSION = "59.0"


def auth_method(options: dict[str, Any]) -> str:
    if options.get("session_id"):
        return "session"
    if options.get("private_key_file"):
        return "jwt"
    if options.get("password"):
        return "password"
    if options.get("consumer_key") and options.get("consumer_secret"):
        return "client_credentials"
    return ""


def http_session(options: dict[str, Any], base_dir: Path) -> requests.Session:
    """A session that trusts exactly the configured CA bundle (or the system's), not REQUESTS_CA_BUNDLE."""
    session = requests.Session()
    session.trust_env = False  # the environment's CA bundle and proxies must not override the mapping
    bundle = options.get("ca_bundle")
    session.verify = str(base_dir / bundle) if bundle else True
    return session


def login_arguments(options: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """The keyword arguments for `simple_salesforce.Salesforce` (the secrets included; never log them)."""
    method = auth_method(options)
    version = str(options.get("api_version", DEFAULT_API_VERSION))
    common: dict[str, Any] = {"version": version}
    if options.get("domain"):
        common["domain"] = options["domain"]
    if method == "session":
        if not options.get("instance_url"):
            raise TargetError("a Salesforce `session_id` needs the `instance_url` it belongs to")
        return {"version": version, "session_id": options["session_id"], "instance_url": options["instance_url"]}
    if method == "password":
        return {**common, "username": options.get("username"), "password": options["password"],
                "security_token": options.get("security_token", "")}
    if method == "jwt":
        key = base_dir / options["private_key_file"]
        if not key.is_file():
            raise TargetError(f"the JWT private key file `{options['private_key_file']}` does not exist")
        return {**common, "username": options.get("username"), "consumer_key": options.get("consumer_key"),
                "privatekey_file": str(key)}
    if method == "client_credentials":
        return {**common, "consumer_key": options["consumer_key"], "consumer_secret": options["consumer_secret"]}
    raise TargetError("no Salesforce credentials: set `session_id` + `instance_url`, `username` + `password` "
                      "(+ `security_token`), `consumer_key` + `private_key_file` (JWT), or `consumer_key` + "
                      "`consumer_secret` (client credentials)")


def login(options: dict[str, Any], base_dir: Path, name: str) -> Salesforce:
    arguments = login_arguments(options, base_dir)
    try:
        return Salesforce(session=http_session(options, base_dir), **arguments)
    except SalesforceAuthenticationFailed as error:
        # Only the error code: the message can name the user.
        raise TargetError(f"Salesforce `{name}`: login failed ({getattr(error, 'code', 'authentication')})") from None
    except requests.RequestException as error:
        raise TargetError(f"Salesforce `{name}`: cannot reach the login service ({type(error).__name__})") from None
