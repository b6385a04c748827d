"""A Django app with what browsers do to a legacy site, for
scripts/real-software.sh: a page with two dozen assets, a form with CSRF
and a file upload, fetch() with JSON, Server-Sent Events, a 20 MB
download and Django's admin (login, add, list, logout). Run by gunicorn
with sync workers: `gunicorn app:application` in this directory, with
THR_APP_DATA naming a directory for its SQLite database."""

import hashlib
import os
import time

from django.conf import settings

DATA = os.environ["THR_APP_DATA"]
settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    SECRET_KEY="real-software-check-" + "x" * 40,
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=[
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "django.contrib.sessions",
        "django.contrib.messages",
        "django.contrib.admin",
        "django.contrib.staticfiles",
    ],
    MIDDLEWARE=[
        "django.middleware.security.SecurityMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
    ],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.path.join(DATA, "db.sqlite3")}},
    TEMPLATES=[
        {
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            "APP_DIRS": True,
            "OPTIONS": {
                "context_processors": [
                    "django.template.context_processors.request",
                    "django.contrib.auth.context_processors.auth",
                    "django.contrib.messages.context_processors.messages",
                ]
            },
        }
    ],
    STATIC_URL="/static/",
    STATIC_ROOT=os.path.join(DATA, "static"),
    DATA_UPLOAD_MAX_MEMORY_SIZE=50_000_000,
    FILE_UPLOAD_MAX_MEMORY_SIZE=50_000_000,
)

import django  # noqa: E402

django.setup()

from django.contrib import admin  # noqa: E402
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse  # noqa: E402
from django.middleware.csrf import get_token  # noqa: E402
from django.urls import path, re_path  # noqa: E402
from django.views.decorators.gzip import gzip_page  # noqa: E402
from django.views.static import serve  # noqa: E402


@gzip_page
def index(request):
    images = "".join(f'<img src="/asset/{i}.svg" width=10>' for i in range(24))
    return HttpResponse(
        f"""<!doctype html><html><head><link rel=stylesheet href="/asset/style.css">
<script src="/asset/app.js"></script></head><body><h1 id=t>hello</h1>{images}
<form id=f method=post action="/upload/" enctype="multipart/form-data">
<input type=hidden name=csrfmiddlewaretoken value="{get_token(request)}">
<input name=note id=note><input type=file name=file id=file><button id=go>go</button></form>
</body></html>"""
    )


def asset(request, name):
    if name.endswith(".css"):
        return HttpResponse("h1{color:red}", content_type="text/css")
    if name.endswith(".js"):
        return HttpResponse("window.loaded=true;", content_type="application/javascript")
    time.sleep(0.02)  # a slow app: the browser's six connections queue
    svg = f'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><text>{name}</text></svg>'
    return HttpResponse(svg, content_type="image/svg+xml")


def upload(request):
    f = request.FILES.get("file")
    data = f.read() if f else b""
    digest = hashlib.sha256(data).hexdigest()
    return HttpResponse(f"<p id=r>note={request.POST.get('note')} size={len(data)} sha={digest}</p>")


def events(request):
    def ticks():
        for i in range(5):
            yield f"id: {i}\ndata: tick {i}\n\n"
            time.sleep(0.2)

    response = StreamingHttpResponse(ticks(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    return response


def download(request):
    mb = int(request.GET.get("mb", "20"))
    response = HttpResponse(hashlib.sha256(b"seed").digest() * (mb * 32768), content_type="application/octet-stream")
    response["Content-Disposition"] = 'attachment; filename="big.bin"'
    return response


def echo(request):
    return JsonResponse(
        {"method": request.method, "body": request.body.decode(errors="replace"), "cookies": request.COOKIES}
    )


urlpatterns = [
    path("", index),
    path("asset/<str:name>", asset),
    path("upload/", upload),
    path("sse/", events),
    path("download/", download),
    path("echo/", echo),
    path("admin/", admin.site.urls),
    re_path(r"^static/(?P<path>.*)$", serve, {"document_root": settings.STATIC_ROOT}),
]


def prepare():
    """The database, the admin's static files and its user (admin / pw12345)."""
    from django.contrib.auth.models import User
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    call_command("collectstatic", interactive=False, verbosity=0)
    if not User.objects.filter(username="admin").exists():
        User.objects.create_superuser("admin", "admin@example.com", "pw12345")


from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()

if __name__ == "__main__":
    prepare()
