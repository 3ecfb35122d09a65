using System.Security.Claims;

namespace OrleansIdempotency.AspNetCore;

/// <summary>Ready-made <see cref="IdempotencyPolicy.Scope"/> resolvers.</summary>
public static class IdempotencyScope
{
    /// <summary>The scope shared by every caller without one, when <see cref="IdempotencyPolicy.AllowAnonymous"/>.</summary>
    public const string Anonymous = "anonymous";

    /// <summary>The authenticated user (<see cref="ClaimTypes.NameIdentifier"/>).</summary>
    public static string? User(HttpContext context) => Claim(ClaimTypes.NameIdentifier)(context);

    /// <summary>The value of the authenticated caller's claim <paramref name="type"/>, for example a tenant id.</summary>
    public static Func<HttpContext, string?> Claim(string type) =>
        context => context.User.Identity?.IsAuthenticated == true ? context.User.FindFirst(type)?.Value : null;

    /// <summary>The value of a request header, for example an API key that identifies the caller.</summary>
    public static Func<HttpContext, string?> Header(string name) =>
        context => context.Request.Headers[name] is { Count: 1 } values && !string.IsNullOrEmpty(values[0]) ? values[0] : null;
}
