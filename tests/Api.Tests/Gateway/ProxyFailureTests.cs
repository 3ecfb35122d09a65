using System.Net.Http;
using OrleansIdempotency.Api.Gateway;
using Yarp.ReverseProxy.Forwarder;

namespace OrleansIdempotency.Api.Tests.Gateway;

/// <summary>Which of the proxy's own failures may follow a request the backend received (the key is then left in doubt).</summary>
public sealed class ProxyFailureTests
{
    public static TheoryData<ForwarderError, Exception?, bool> Failures() => new()
    {
        { ForwarderError.NoAvailableDestinations, null, false },
        { ForwarderError.RequestCreation, new InvalidOperationException(), false },
        { ForwarderError.Request, new HttpRequestException(HttpRequestError.ConnectionError, "refused"), false },
        { ForwarderError.Request, new HttpRequestException(HttpRequestError.NameResolutionError, "no such host"), false },
        { ForwarderError.Request, new HttpRequestException(HttpRequestError.ResponseEnded, "ended early"), true },
        { ForwarderError.Request, new HttpRequestException("unknown"), true },
        // SocketsHttpHandler's ConnectTimeout: a TaskCanceledException around a TimeoutException.
        { ForwarderError.RequestTimedOut, new TaskCanceledException("connect timed out", new TimeoutException()), false },
        // YARP's activity time-out: the request may have gone out.
        { ForwarderError.RequestTimedOut, new TaskCanceledException(), true },
        { ForwarderError.RequestBodyDestination, new IOException(), true },
        { ForwarderError.ResponseHeaders, new InvalidOperationException(), true },
    };

    [Theory]
    [MemberData(nameof(Failures))]
    public void MayHaveReachedTheBackend_OnlyUnlessNothingWasSent(ForwarderError error, Exception? exception, bool mayHave)
    {
        Assert.Equal(mayHave, GatewayExtensions.MayHaveReachedTheBackend(new Failure(error, exception)));
    }

    private sealed record Failure(ForwarderError Error, Exception? Exception) : IForwarderErrorFeature;
}
