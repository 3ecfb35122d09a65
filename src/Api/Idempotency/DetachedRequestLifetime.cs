using Microsoft.AspNetCore.Http.Features;

namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// The request lifetime an idempotent action sees: its <see cref="RequestAborted"/> does not fire when the client
/// goes away, so the action runs to its end and its whole response is stored for the client's retry.
/// </summary>
/// <remarks>
/// An action stopped by the disconnect leaves no outcome to replay (it may have taken effect, so its key would be
/// left in doubt), and ASP.NET Core's JSON writers, which stop at their next flush once the client has gone and
/// swallow the cancellation, would hand the layer the start of a body to store as the outcome. <see cref="Abort"/>
/// still aborts the connection, and <see cref="Reset"/> the HTTP/2 or HTTP/3 stream (where the server offers it).
/// </remarks>
internal sealed class DetachedRequestLifetime(IHttpRequestLifetimeFeature connection, IHttpResetFeature? stream)
    : IHttpRequestLifetimeFeature, IHttpResetFeature
{
    public CancellationToken RequestAborted { get; set; }

    /// <summary>
    /// True once the action aborted its connection or reset its stream itself (as a proxy does when its backend fails
    /// mid-body): what it wrote is not its whole response.
    /// </summary>
    public bool Aborted { get; private set; }

    /// <summary>
    /// True once the action said it cannot tell whether it took effect (a proxy whose backend may have received the
    /// request, then failed to answer it): its response goes to its client, but is no outcome to store or release on.
    /// </summary>
    public bool InDoubt { get; set; }

    public void Abort()
    {
        Aborted = true;
        connection.Abort();
    }

    public void Reset(int errorCode)
    {
        Aborted = true;
        (stream ?? throw new InvalidOperationException("The server offers no stream reset for this request.")).Reset(errorCode);
    }
}
