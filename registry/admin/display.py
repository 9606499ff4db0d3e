"""How the admin pages show values: state badges and "5 minutes ago" times. Helpers only, apart
from the modules that register admin classes, so that every one of those imports them from here
and none imports another (django.contrib.auth's admin and forms are split the same way).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.timesince import timesince

# Colours that read on the admin's light and dark themes alike.
_BADGE_COLOURS = {
    "connected": "#1f7a3a",
    "open": "#1f7a3a",
    "disconnected": "#6b6b6b",
    "closed": "#6b6b6b",
    "usable": "#1f7a3a",
    "active": "#1f7a3a",
    "disabled": "#b42318",
    "revoked": "#b42318",
    "expired": "#8a5a00",
    "used": "#6b6b6b",
}


def badge(label: str) -> SafeString:
    return format_html(
        '<span class="rv-badge rv-badge-{}" style="display:inline-block;padding:1px 8px;'
        "border-radius:9px;color:#fff;background:{};font-size:11px;font-weight:600;"
        'letter-spacing:.02em">{}</span>',
        label,
        _BADGE_COLOURS.get(label, "#6b6b6b"),
        label,
    )


def ago(moment: datetime | None, now: datetime | None = None) -> SafeString | str:
    """`5 minutes ago`, with the exact time on hover."""
    if moment is None:
        return "-"
    now = now or timezone.now()
    label = (
        "just now"
        if now - moment < timedelta(minutes=1)
        else f"{timesince(moment, now, depth=1)} ago"
    )
    local = timezone.localtime(moment)
    return format_html(
        '<time datetime="{}" title="{}">{}</time>',
        moment.isoformat(),
        local.strftime("%Y-%m-%d %H:%M:%S %Z"),
        label,
    )
