using System.Globalization;

namespace OrleansIdempotency.Api.Demo;

/// <summary>
/// The demonstration headers (DESIGN §8), honoured by the demo's POSTs and not part of the request fingerprint:
/// <c>X-Demo-Delay-Ms: N</c> (0–10000) makes the action sleep first, so concurrency can be observed;
/// <c>X-Demo-Fail: 500</c> (any 5xx) makes it answer that status without side effects.
/// </summary>
/// <remarks>
/// The demo's actions, this sleep included, do not stop when the client goes away: a client that timed out
/// retries, and an action that ran to its end has an outcome to replay. Behind the layer they could not see the
/// disconnect anyway (<c>DetachedRequestLifetime</c>); they do not depend on it.
/// </remarks>
internal static class DemoHeaders
{
    public const string Delay = "X-Demo-Delay-Ms";
    public const string Fail = "X-Demo-Fail";
    public const int MaxDelayMs = 10_000;

    /// <summary>Sleeps as asked; returns the answer to give instead of running the action, or null to run it.</summary>
    public static async Task<IResult?> ApplyAsync(HttpContext context)
    {
        var headers = context.Request.Headers;
        if (headers.TryGetValue(Delay, out var delayValue))
        {
            if (!int.TryParse(delayValue, NumberStyles.None, CultureInfo.InvariantCulture, out var delay) || delay > MaxDelayMs)
            {
                return Results.Problem(statusCode: 400, title: "Invalid demo header", detail: $"{Delay} must be a whole number from 0 to {MaxDelayMs}.");
            }

            await Task.Delay(delay);
        }

        if (headers.TryGetValue(Fail, out var failValue))
        {
            if (!int.TryParse(failValue, NumberStyles.None, CultureInfo.InvariantCulture, out var status) || status is < 500 or > 599)
            {
                return Results.Problem(statusCode: 400, title: "Invalid demo header", detail: $"{Fail} must be a 5xx status code, such as 500.");
            }

            return Results.Problem(statusCode: status, title: "Demo failure", detail: $"The action failed on purpose ({Fail}); nothing was stored.");
        }

        return null;
    }
}
