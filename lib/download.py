"""
Downloads with retries, a sha256 check and a progress line, written under a temporary name so a
killed download never looks complete; failures become one line (offline, HTTP status, timeout).
Big files (a corpus's data files) resume where a cut connection or a killed run stopped.
"""
import hashlib
import os
import sys
import time
from pathlib import Path

import requests

from lib.tokenfiles import PrepareError, sha256_of


class Offline(PrepareError):
    """No network: a download failed to connect at all (name lookup, refused, unreachable)."""


_last_draw = [0.0]
_drawn = [False]  # a line of the current job was shown (in a log, its last line is then shown too)


def progress(label, done, total=None, final=False, count=None):
    """Own one-line progress on stderr (no tqdm dependency): a bar redrawn in place on a
    terminal, a plain line every 10 s otherwise (logs, CI). done/total set the bar; count is
    the text shown for the amount (default 'done/total'), e.g. tokens written so far."""
    now = time.monotonic()
    tty = sys.stderr.isatty()
    if not final and now - _last_draw[0] < (0.2 if tty else 10.0):  # per-block redraws would flood logs
        return
    if final and not tty and not _drawn[0]:
        return  # quick work in a log: the summary that follows says it all
    _drawn[0] = not final
    _last_draw[0] = now
    count = count or (f"{done:,}/{total:,}" if total else f"{done:,}")
    if total:
        frac = min(done / total, 1.0)
        bar = f"[{'#' * int(30 * frac):<30}] " if tty else ""
        text = f"{label} {bar}{100 * frac:5.1f}% {count}"
    else:
        text = f"{label} {count}"
    if tty:
        sys.stderr.write("\r" + text + ("\n" if final else ""))
    else:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()



def request_problem(error, url, timeout):
    """A failed request as a short phrase (never cut mid-word or mid-URL), and whether it is worth
    retrying: no connection at all means offline (fails at once), a timeout, a cut transfer or a
    server error (5xx) may pass."""
    host = url.split('/')[2] if '://' in url else url
    if isinstance(error, requests.Timeout):
        return f"no answer from {host} within {timeout} s", True
    offline = ("Name or service not known", "name resolution", "NameResolutionError", "nodename nor servname",
               "Failed to establish a new connection", "Network is unreachable", "Connection refused")
    if isinstance(error, requests.ConnectionError) and any(o in str(error) for o in offline):
        return f"cannot connect to {host}: no network, or it is blocked", False
    if isinstance(error, requests.HTTPError) and error.response is not None:
        status = error.response.status_code
        return f"HTTP {status} {error.response.reason or ''}".strip(), status >= 500
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text if len(text) <= 100 else text[:100].rsplit(' ', 1)[0] + ' ...'}", True


def download(url, dest, sha256=None, retries=3, timeout=30, backoff=2.0):
    """Fetch url into dest (reused when present and matching), via a temp name; returns sha256."""
    dest = Path(dest)
    if dest.exists():  # a previous run (or the user) already put it there
        digest = sha256_of(dest)
        if sha256 is None or digest == sha256:
            return digest
        print(f"{dest} has the wrong sha256; downloading again", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # the final name appears only once the bytes are complete and verified, so a killed
    # download is never mistaken for the real file on the next run
    tmp = dest.with_name(dest.name + ".part")
    problem = None
    for attempt in range(1, retries + 1):
        try:
            with requests.get(url, stream=True, timeout=timeout) as r:
                r.raise_for_status()
                total = int(r.headers.get("content-length") or 0) or None  # absent when compressed
                h, done = hashlib.sha256(), 0
                with open(tmp, "wb") as f:
                    for block in r.iter_content(chunk_size=1 << 16):
                        f.write(block)
                        h.update(block)
                        done += len(block)
                        progress(f"downloading {dest.name}", done, total, count=f"{done:,} bytes" + (f" of {total:,}" if total else ""))
                    f.flush()
                    os.fsync(f.fileno())
                progress(f"downloading {dest.name}", done, total, final=True, count=f"{done:,} bytes")
            digest = h.hexdigest()
            # a mismatch is retried too: proxies and captive portals return wrong bytes with 200
            if sha256 is not None and digest != sha256:
                problem = f"sha256 mismatch (got {digest[:12]}..., expected {sha256[:12]}...)"
            else:
                os.replace(tmp, dest)
                return digest
        except requests.RequestException as e:  # offline, DNS, timeout, HTTP 4xx/5xx
            problem, worth_retrying = request_problem(e, url, timeout)
            if not worth_retrying:
                tmp.unlink(missing_ok=True)
                raise (Offline if isinstance(e, requests.ConnectionError) else PrepareError)(
                    f"could not download {url} ({problem}); put the file at {dest} or pass --input=PATH "
                    f"to a local copy") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if tmp.exists():
            tmp.unlink()
        if attempt < retries:
            print(f"download of {url} failed ({problem}); retry {attempt}/{retries - 1}", file=sys.stderr)
            time.sleep(backoff * attempt)  # linear backoff: a blip passes, a dead network fails fast
    raise PrepareError(f"could not download {url} ({problem}); put the file at {dest} or pass --input=PATH "
                       f"to a local copy")


DOWNLOAD_BLOCK = 1 << 20  # bytes per write; a cut connection loses at most the block in flight


def download_resumable(url, dest, size=None, sha256=None, retries=5, timeout=60, backoff=2.0):
    """Fetch url into dest via dest.part, resuming with an HTTP Range request after an
    interruption (also across runs); checked by size and sha256 where known. Returns dest."""
    dest = Path(dest)
    if dest.exists() and (size is None or dest.stat().st_size == size):
        return dest  # verified when it was downloaded; re-hashing 27 GB on every run costs minutes
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")  # kept on failure: the next try asks for the rest only
    problem = None
    for attempt in range(1, retries + 1):
        have = tmp.stat().st_size if tmp.exists() else 0
        if size is not None and have > size:  # not this file's prefix
            tmp.unlink()
            have = 0
        try:
            if size is None or have < size:
                headers = {"Range": f"bytes={have}-"} if have else {}
                with requests.get(url, stream=True, timeout=timeout, headers=headers) as r:
                    r.raise_for_status()
                    if have and r.status_code != 206:  # the server ignored Range: start over
                        have = 0
                    done = have
                    with open(tmp, "ab" if have else "wb") as f:
                        for block in r.iter_content(chunk_size=DOWNLOAD_BLOCK):
                            f.write(block)
                            done += len(block)
                            progress(f"downloading {dest.name} (bytes)", done, size)
                        f.flush()
                        os.fsync(f.fileno())
                progress(f"downloading {dest.name} (bytes)", done, size, final=True)
            got = tmp.stat().st_size
            if size is not None and got != size:
                problem = f"got {got:,} bytes of {size:,}"
            elif sha256 and sha256_of(tmp) != sha256:
                tmp.unlink()  # wrong bytes, not a short read: resuming would keep them
                problem = "sha256 mismatch"
            else:
                os.replace(tmp, dest)
                return dest
        except requests.RequestException as e:  # offline, timeout, cut connection, HTTP 4xx/5xx
            problem, worth_retrying = request_problem(e, url, timeout)
            if not worth_retrying:
                break
        if attempt < retries:
            print(f"\ndownload of {url} failed ({problem}); retry {attempt}/{retries - 1}", file=sys.stderr)
            time.sleep(backoff * attempt)
    raise PrepareError(f"could not download {url} ({problem}); a re-run resumes from {tmp}, "
                       f"or pass --input=FOLDER with the {dest.suffix} files")
