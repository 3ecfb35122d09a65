using Microsoft.AspNetCore.Http.Features;

namespace OrleansIdempotency.AspNetCore;

/// <summary>The server's bound on a request's body, as the layer's own bounds need it.</summary>
internal static class RequestBodyLimit
{
    /// <summary>
    /// Raises the server's limit (Kestrel's is 30,000,000 bytes unless set) to <paramref name="bytes"/> where it is
    /// lower, before the body is read: the layer reads a body within its own bound and refuses one past it with its
    /// own problem, and a bound configured above the server's must not be cut short by it into a 413 of the server's.
    /// A limit that can no longer change (the body is being read) is left as it is.
    /// </summary>
    public static void AllowUpTo(HttpContext context, long bytes)
    {
        if (context.Features.Get<IHttpMaxRequestBodySizeFeature>() is { IsReadOnly: false, MaxRequestBodySize: { } limit } feature && limit < bytes)
        {
            feature.MaxRequestBodySize = bytes;
        }
    }
}
