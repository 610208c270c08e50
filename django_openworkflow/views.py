from django.http import HttpResponse


def run_list(request):  # placeholder until the pages land
    return HttpResponse("")


run_detail = run_resume = run_cancel = run_list
